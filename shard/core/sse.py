"""Server-Sent Events framing (PROTOCOL.md 5.8) as a pure state machine.

The runtime sends `session.head`, then loops: fetch committed records with
`end > session.position` (about `session.read_bytes` of them), write `session.step(state, records,
now)`, stop when `session.done`; otherwise wait until the tail passes `session.position`,
the stream closes or disappears, or `session.ends_at` (then end the response).
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Iterable

from . import jsonmode
from .cursor import current_interval, next_cursor
from .headers import is_json, is_sse_text
from .model import CoreConfig, Record, Response, StreamState
from .offsets import encode
from .reads import collect

_EVENT_DATA = b"event: data\n"
_EVENT_CONTROL = b"event: control\ndata:"
# Stream data per `data` event (more when one record is larger). Well under what a
# gateway lets one SSE reader lag (1 MiB) even base64-encoded, so a reader that keeps up
# is never dropped for the size of one event, and framing an event is bounded work.
SSE_EVENT_BYTES = 256 * 1024


def data_event(payload: bytes) -> bytes:
    """An `event: data` frame. Every CR, LF or CRLF in the payload starts a new `data:`
    line, so payload bytes can never end the event or inject another one."""
    if b"\n" in payload or b"\r" in payload:
        lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"\n".join([(b"data: " if ln[:1] == b" " else b"data:") + ln for ln in lines])
    else:
        # "data:" without a space: clients strip exactly one leading space, so a payload
        # that starts with a space gets "data: " to keep it.
        body = (b"data: " if payload[:1] == b" " else b"data:") + payload
    return _EVENT_DATA + body + b"\n\n"


def _first_bytes(records: Iterable[Record], budget: int) -> list[Record]:
    """The leading records holding `budget` bytes of data (at least one)."""
    out: list[Record] = []
    size = 0
    for record in records:
        out.append(record)
        size += len(record.data)
        if size >= budget:
            break
    return out


class SseSession:
    """One SSE response: what has been sent (`position`) and what to send next."""

    __slots__ = (
        "head",
        "position",
        "read_bytes",
        "done",
        "ends_at",
        "_created_at",
        "_json",
        "_base64",
        "_cursor_floor",
        "_config",
        "_started",
    )

    def __init__(
        self,
        state: StreamState,
        position: int,
        client_cursor: str | None,
        now: float,
        config: CoreConfig,
    ) -> None:
        ct = state.content_type
        self._json = is_json(ct)
        self._base64 = not is_sse_text(ct)
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        if self._base64:
            headers.append(("stream-sse-data-encoding", "base64"))
        self.head = Response(200, tuple(headers))
        self.position = position
        self.read_bytes = min(config.max_read_bytes, SSE_EVENT_BYTES)
        self.done = False
        self.ends_at = now + config.sse_max_duration
        self._created_at = state.created_at
        self._cursor_floor = next_cursor(client_cursor, now, config)
        self._config = config
        self._started = False

    def step(self, state: StreamState | None, records: Iterable[Record], now: float) -> bytes:
        """Frames for whatever `records` (committed, end > position) add, then a control
        event; the first call always emits a control event. Sets `done` once the stream
        is closed and fully sent (the final control carries `streamClosed`), when the
        stream is gone, or at `ends_at`."""
        if self.done:
            return b""
        if state is None or state.soft_deleted or state.created_at != self._created_at:
            self.done = True
            return b""
        tail = state.tail
        out: list[bytes] = []
        parts, end = collect(
            _first_bytes(records, self.read_bytes), self.position, tail, self._json
        )
        if parts:
            if self._json:
                out.append(data_event(jsonmode.render(parts)))
            elif self._base64:
                out.append(_EVENT_DATA + b"data:" + b64encode(b"".join(parts)) + b"\n\n")
            else:
                out.append(data_event(b"".join(parts)))
            self.position = end
        at_tail = self.position >= tail
        closed = state.closed and at_tail
        if parts or closed or not self._started:
            out.append(self._control(at_tail, closed, now))
            self._started = True
        if closed or now >= self.ends_at:
            self.done = True
        return b"".join(out)

    def _control(self, at_tail: bool, closed: bool, now: float) -> bytes:
        offset = encode(self.position)
        if closed:
            # streamClosed implies upToDate; no cursor: the client must not reconnect.
            body = f'{{"streamNextOffset":"{offset}","streamClosed":true,"upToDate":true}}'
        else:
            cursor = max(self._cursor_floor, current_interval(now, self._config))
            body = f'{{"streamNextOffset":"{offset}","streamCursor":"{cursor}"'
            body += ',"upToDate":true}' if at_tail else "}"
        return _EVENT_CONTROL + body.encode() + b"\n\n"
