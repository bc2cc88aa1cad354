"""One logging setup for every process role: plain text for people, JSON lines for machines.

`--log-format text|json` and `--log-level` are read by `setup`, which
every role calls once at start. A JSON line holds `ts` (RFC 3339, UTC, milliseconds),
`level`, `logger`, `msg`, the process's `role` (gateway, shard, supervisor), its `id`
(the shard id, the gateway's listen address, "supervisor") and `pid`, then any fields a
caller passed with `extra={...}` (the access log's request id, status, duration...), and
`exc` with the traceback of a logged exception. Text lines carry the same identity
before the level, and the extra fields as `key=value` after the message.

`LineWriter` writes the lines of one hot logger (the gateway's access log: one line per
request) in the same format to the same stream, without a LogRecord, a caller lookup or
a formatter call per line, which together cost several times the line itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")
_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line",
    )


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller added with `extra=`."""
    names = record.__dict__.keys() - _RESERVED
    return {k: record.__dict__[k] for k in sorted(names) if k[0] != "_"}


_second = -1
_second_text = ""


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-12-02T12:30:01.123Z (the date and time
    formatted once per second)."""
    global _second, _second_text
    seconds = int(created)
    if seconds != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = seconds
    return f"{_second_text}.{int((created - seconds) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, role: str, ident: str) -> None:
        super().__init__()
        self._identity = {"role": role, "id": ident, "pid": os.getpid()}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self._identity,
        }
        for key, value in _extras(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TIME ID LEVEL LOGGER: MESSAGE key=value ...` (the time in UTC, RFC 3339)."""

    def __init__(self, ident: str) -> None:
        super().__init__()
        self._ident = ident

    def format(self, record: logging.LogRecord) -> str:
        text = (
            f"{_timestamp(record.created)} {self._ident} {record.levelname} "
            f"{record.name}: {record.getMessage()}"
        )
        extras = _extras(record)
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def formatter(log_format: str, role: str, ident: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(role, ident)
    if log_format == "text":
        return TextFormatter(ident)
    raise ValueError(f"log format {log_format!r}: expected text or json")


def level_of(name: str | int | None) -> int:
    """A level from its name (any case) or number; INFO when unknown or None."""
    if isinstance(name, int):
        return name
    level = logging.getLevelName(str(name or "INFO").upper())
    return level if isinstance(level, int) else logging.INFO


_HANDLER: logging.StreamHandler[TextIO] | None = None  # what `setup` installed
_FORMAT = "text"
_IDENTITY = ("", "")  # role, id


class LineWriter:
    """Writes INFO lines of the logger `name` as `setup` configured (format, stream,
    identity), cheaply; nothing when that logger is not enabled for INFO. Without
    `setup` (a library user's own logging), it goes through `logging` as usual."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)
        self._handler = _HANDLER
        role, ident = _IDENTITY
        self._json = _FORMAT == "json"
        if self._json:
            identity = {"role": role, "id": ident, "pid": os.getpid()}
            self._head = f'", "level": "INFO", "logger": {json.dumps(name)}, "msg": '
            self._identity = ", " + json.dumps(identity, ensure_ascii=False)[1:-1]
        else:
            self._head = f" {ident} INFO {name}: "

    def write(self, message: str, fields: Mapping[str, Any]) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        handler = self._handler
        if handler is None:
            self._logger.info("%s", message, extra=dict(fields))
            return
        ts = _timestamp(time.time())
        if self._json:
            rest = ", " + json.dumps(fields, default=str, ensure_ascii=False)[1:] if fields else "}"
            line = f'{{"ts": "{ts}{self._head}{json.dumps(message)}{self._identity}{rest}\n'
        else:
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{ts}{self._head}{message} {pairs}\n"
        handler.acquire()
        try:
            handler.stream.write(line)
            handler.stream.flush()
        except OSError:
            pass  # like logging: a log that cannot be written must not fail the request
        finally:
            handler.release()


def setup(
    role: str,
    ident: str,
    *,
    level: str | int | None = None,
    log_format: str = "text",
    stream: TextIO | None = None,
) -> None:
    """Send every logger's records to `stream` (stderr) in `log_format`, replacing any
    handler set before, so each line is written once and in one format."""
    global _HANDLER, _FORMAT, _IDENTITY
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(log_format, role, ident))
    _HANDLER, _FORMAT, _IDENTITY = handler, log_format, (role, ident)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_of(level))
