"""HTTP/1.1 response framing: status lines, header blocks, chunks.

The gateway writes its HTTP/1.1 responses itself (`gateway.http1`), and the SSE fan-out
frames each relayed chunk once for all of its clients (`gateway.fanout`): both build
their bytes here, so that every byte of a response's framing comes from one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

Headers = list[tuple[bytes, bytes]]

LAST_CHUNK = b"0\r\n\r\n"  # ends a chunked body (no trailers)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED = (b"transfer-encoding", b"chunked")
CLOSE = (b"connection", b"close")
# The status line of every registered status (`status_line` makes the others).
STATUS_LINES = {
    int(status): b"HTTP/1.1 %d %b\r\n" % (status, status.phrase.encode("ascii"))
    for status in HTTPStatus
}


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body (empty data: nothing, which would end it)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunk_head(size: int) -> bytes:
    """The size line of a chunk of `size` bytes, for a body written apart from it."""
    return b"%x\r\n" % size


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % status


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`headers` as the lines of a header block (written as given: they come from the
    gateway itself, never from a client)."""
    return b"".join([b"%b: %b\r\n" % (name, value) for name, value in headers])


def response_head(status: int, *header_lists: Headers) -> bytes:
    """Status line and header block, ending in the blank line. Names and values are
    written as given: they come from the gateway itself, never from a client."""
    parts = [status_line(status)]
    for headers in header_lists:
        for name, value in headers:
            parts.append(b"%b: %b\r\n" % (name, value))
    parts.append(b"\r\n")
    return b"".join(parts)


def has_body(method: str, status: int) -> bool:
    """Whether a response to `method` with `status` carries a body (RFC 9110 6.4.1)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)
