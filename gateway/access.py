"""Request ids and the access log, for the native route and the ASGI app alike.

Every response carries `X-Request-Id`: the client's own when it sent a usable one (1 to
128 visible ASCII characters), else a new random one, so a client can quote it and an
operator find the request's log line. With `--access-log`, one line per request goes to
the `access` logger, written by whichever path served the request (no ASGI detour, so
the access log does not turn the native route off): request id, method, route template,
path, status (499: the client left before the answer), duration, bytes in and out, and
`via` (native or asgi). With `--log-format json` each of those is a field of the line
(`common/logs.py`).
"""

from __future__ import annotations

import re
from binascii import hexlify
from collections.abc import Awaitable, Callable
from random import getrandbits
from time import perf_counter
from typing import Any

from ds_cluster.common.logs import LineWriter

REQUEST_ID = b"x-request-id"
MAX_REQUEST_ID = 128
STREAM_ROUTE = "/v1/stream/{path}"
CLIENT_GONE = 499  # logged status of a request whose client left before its answer
_USABLE_ID = re.compile(rb"[!-~]{1,%d}" % MAX_REQUEST_ID)
_KNOWN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def new_request_id() -> bytes:
    """16 random hex digits (to tell requests apart, not a secret: no system call)."""
    return hexlify(getrandbits(64).to_bytes(8, "big"))  # (a third faster than "%016x")


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-Id when usable, else a new one."""
    for name, value in headers:
        if name == REQUEST_ID:
            return given_or_new(value)
    return new_request_id()


def given_or_new(given: bytes | None) -> bytes:
    """`request_id` of a request whose first X-Request-Id (None: it sent none) was noted
    as its head was parsed, so that its headers are not looked through again."""
    if given is not None and _USABLE_ID.fullmatch(given):
        return given
    return hexlify(getrandbits(64).to_bytes(8, "big"))


def route_template(path: str) -> str:
    """The route a path matched, for logs (a bounded set of values)."""
    if path.startswith("/v1/stream/"):
        return STREAM_ROUTE
    return path if path in _KNOWN_ROUTES else "other"


class AccessLog:
    """Writes one line per request to the `access` logger (create it after
    `common.logs.setup`, whose format and stream it writes to)."""

    def __init__(self) -> None:
        self._lines = LineWriter("access")

    def write(
        self,
        rid: bytes,
        method: str,
        path: str,
        status: int,
        started: float,
        bytes_in: int,
        bytes_out: int,
        via: str,
    ) -> None:
        """`started`: perf_counter() when the request head was read."""
        duration = perf_counter() - started
        self._lines.write(
            f"{method} {path} {status}",
            {
                "request_id": rid.decode("ascii"),
                "method": method,
                "route": route_template(path),
                "path": path,
                "status": status,
                "duration_s": round(duration, 6),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "via": via,
            },
        )


def with_request_ids(app: App, access: AccessLog | None) -> App:
    """`app` with X-Request-Id on every HTTP response and, when `access` is given, a line
    in the access log once the response is over (an SSE read: when it ends)."""

    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        rid = request_id(scope["headers"])

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REQUEST_ID, rid)]}
            await send(message)

        await app(scope, receive, send_with_id)

    if access is None:
        return plain

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = perf_counter()
        rid = request_id(scope["headers"])
        counts = [0, 0, 0]  # bytes in, bytes out, status (0: no response started)

        async def counted_receive() -> Message:
            message = await receive()
            counts[0] += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                counts[2] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (REQUEST_ID, rid)]}
            elif kind == "http.response.body":
                counts[1] += len(message.get("body", b""))
            await send(message)

        failed = True
        try:
            await app(scope, counted_receive, send_with_id)
            failed = False
        finally:
            received, sent, status = counts
            if not status:  # hypercorn answers 500 for a failed app, nothing to one gone
                status = 500 if failed else CLIENT_GONE
            path = scope.get("path", "")
            access.write(rid, scope["method"], path, status, started, received, sent, "asgi")

    return logged
