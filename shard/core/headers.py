"""Parsing and validation of the protocol's request headers and query parameters.

Every parser here is strict (PROTOCOL.md 5.1, 5.2.1, 8) and raises `ProtocolError(400)` on
malformed input, so a bad request is rejected before anything changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from urllib.parse import unquote_plus

from .errors import bad_request

MAX_SAFE_INTEGER = 2**53 - 1  # producer epochs/seqs must fit a JS number

_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # no sign, no leading zeros, no exponent
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(_TOKEN + "/" + _TOKEN)

DEFAULT_CONTENT_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"


def is_true(value: str | None) -> bool:
    """`Stream-Closed` semantics (4.1): present only when exactly `true`, any case."""
    return value is not None and value.strip().lower() == "true"


def parse_ttl(value: str) -> int:
    """`Stream-TTL`: a non-negative decimal integer without sign or leading zeros."""
    value = value.strip()
    if not _DECIMAL.fullmatch(value) or len(value) > 15:
        raise bad_request("invalid Stream-TTL: expected a non-negative integer of seconds")
    return int(value)


def parse_expires_at(value: str) -> float:
    """`Stream-Expires-At`: an RFC 3339 timestamp, returned as unix seconds."""
    m = _RFC3339.fullmatch(value.strip())
    if m is None:
        raise bad_request("invalid Stream-Expires-At: expected an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7)
    zone = m.group(8)
    if zone in ("Z", "z"):
        tz = UTC
    else:
        sign = 1 if zone[0] == "+" else -1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise bad_request("invalid Stream-Expires-At: bad UTC offset")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        when = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=tz)
    except ValueError:
        raise bad_request("invalid Stream-Expires-At: no such date or time") from None
    return when.timestamp() + (float(frac) if frac else 0.0)


def parse_sub_offset(value: str) -> int:
    """`Stream-Fork-Sub-Offset`: a non-negative decimal integer without sign/leading zeros."""
    value = value.strip()
    if not _DECIMAL.fullmatch(value) or len(value) > 16:
        raise bad_request("invalid Stream-Fork-Sub-Offset: expected a non-negative integer")
    return int(value)


def parse_producer(headers: Mapping[str, str]) -> tuple[str, int, int] | None:
    """The `(Producer-Id, Producer-Epoch, Producer-Seq)` triple, or None if none is sent.

    All three or none (5.2.1); the id must be non-empty; epoch and seq are plain decimal
    integers no larger than 2^53-1."""
    pid = headers.get("producer-id")
    epoch = headers.get("producer-epoch")
    seq = headers.get("producer-seq")
    if pid is None and epoch is None and seq is None:
        return None
    if pid is None or epoch is None or seq is None:
        raise bad_request("Producer-Id, Producer-Epoch and Producer-Seq must be provided together")
    pid = pid.strip()
    if not pid:
        raise bad_request("invalid Producer-Id: must not be empty")
    return pid, _parse_uint(epoch, "Producer-Epoch"), _parse_uint(seq, "Producer-Seq")


def _parse_uint(value: str, name: str) -> int:
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 16:
        raise bad_request(f"invalid {name}: expected a non-negative integer <= 2^53-1")
    number = int(value)
    if number > MAX_SAFE_INTEGER:
        raise bad_request(f"invalid {name}: expected a non-negative integer <= 2^53-1")
    return number


@lru_cache(maxsize=1024)
def media_type(content_type: str) -> str:
    """The comparable part of a content type: lower-cased, parameters dropped."""
    return content_type.split(";", 1)[0].strip().lower()


@lru_cache(maxsize=1024)
def valid_content_type(content_type: str) -> bool:
    return _MEDIA_TYPE.fullmatch(media_type(content_type)) is not None


@lru_cache(maxsize=1024)
def is_json(content_type: str) -> bool:
    """JSON mode (9.1) applies to `application/json`, with or without parameters."""
    return media_type(content_type) == JSON_MEDIA_TYPE


@lru_cache(maxsize=1024)
def is_sse_text(content_type: str) -> bool:
    """SSE carries `text/*` and `application/json` as text; everything else as base64."""
    media = media_type(content_type)
    return media.startswith("text/") or media == JSON_MEDIA_TYPE


def request_content_type(headers: Mapping[str, str]) -> str | None:
    """The request's Content-Type, None when absent or blank; 400 when malformed."""
    value = headers.get("content-type")
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if not valid_content_type(value):
        raise bad_request("invalid Content-Type")
    return value


def parse_read_query(query: str) -> tuple[str | None, str | None, str | None]:
    """`(offset, live, cursor)` from a raw query string; unknown parameters are ignored.

    An empty or repeated `offset` is a 400 (8: offsets are single, non-empty tokens)."""
    offset = live = cursor = None
    if not query:
        return None, None, None
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if key == "offset":
            if offset is not None:
                raise bad_request("multiple offset parameters")
            if "%" in value or "+" in value:
                value = unquote_plus(value)
            if not value:
                raise bad_request("empty offset parameter")
            offset = value
        elif key == "live":
            live = unquote_plus(value) if "%" in value or "+" in value else value
        elif key == "cursor":
            cursor = unquote_plus(value) if "%" in value or "+" in value else value
    return offset, live, cursor
