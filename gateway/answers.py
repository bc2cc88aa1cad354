"""Whole answers the gateway writes, and the errors it answers by itself.

An `Answer` is a status, response headers and a whole body: what the native route
writes in one go, what collapsed long-polls share. A gateway error is short plain text
for the person reading it (clients act on the status and headers), carries the transport
headers like every other response and is never cached. Every gateway error, on every
path (native HTTP/1.1, ASGI, the control endpoints, a refused request head), is built
here, so they all look alike.
"""

from __future__ import annotations

from ds_cluster.gateway.headers import NO_STORE, TRANSPORT

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, response headers, body
# What the native HTTP/1.1 route writes: an Answer, or one whose headers are rendered
# already as header lines (Content-Length included where the response has a body), so
# that a forwarded answer builds no header list only to render it.
NativeAnswer = tuple[int, list[tuple[bytes, bytes]] | bytes, bytes]

TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")
_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def error_answer(status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Answer:
    """A gateway-generated error: `message` and a newline as plain text, never cached."""
    body = message.encode() + b"\n"
    headers = [TEXT_PLAIN, (b"content-length", b"%d" % len(body)), NO_STORE, *TRANSPORT, *extra]
    return status, headers, body


def body_too_large(limit: int) -> str:
    """The 413 message. It states the limit, so the client knows what its body must fit."""
    return f"request body exceeds the limit of {limit} bytes{_in_units(limit)}"


def _in_units(size: int) -> str:
    """` (64 MiB)` for a whole number of the largest unit that fits; else nothing."""
    for unit, name in _UNITS:
        if size >= unit and size % unit == 0:
            return f" ({size // unit} {name})"
    return ""
