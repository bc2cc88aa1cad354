"""The lean handler for /v1/stream/*: validate, forward to the owning shard, write back
what it answers.

No framework on this path (a quart-trio route serves about half the requests/s of plain
ASGI on hypercorn-trio). The gateway holds no protocol semantics: it checks only what any
HTTP front end checks (path shape, method, body size, header well-formedness) and adds
transport headers; everything else is the shard's answer, passed through.

What a request means (its kind, stream path, forwarded headers, share key, or why it is
refused) is decided by one pure function, `gateway.route.route()`, on every path; this
module adds the client's token check and acts on the answer. Three entries. `takes()`
tells the native route (`gateway.native`) which requests it serves; it then calls
`answer()` for requests with one whole answer (long-polls included) and `stream()` for
SSE reads, straight from the HTTP/1.1 connection with no ASGI in between. The ASGI
`__call__` serves the rest (HTTP/2, HTTP/1.0 SSE, percent-encoded live queries), the
same way.

Client disconnects: only live reads can wait long, so only they watch their client (a
native long-poll watches its idle socket, an ASGI one its receive channel; a long-poll
only once its wait has lasted a moment, `gateway.collapse`), and the shard is sent
`cancel` when the last client of a call leaves. Other requests are answered as
soon as the shard has decided (for writes: committed).

Sharing: identical long-polls in flight at the same time (same path, raw query string and
forwarded headers) share one shard call and one rendered answer (`gateway.collapse`); SSE
reads of the same key share one upstream (`gateway.fanout`), whose clients each have a
bounded backlog.

Large catch-up bodies: the gateway keeps the ones a shard names with a body token
(`gateway.body_cache`, by path and raw query) and sends the token with the next such GET;
the shard decides the answer as always and leaves the body out when it is that very one.

Errors: 503 with Retry-After only when the request certainly did not run; 502 / 504 when
the shard may have run it (`failure_answer`). The client's Host is not forwarded: a PUT
carries the gateway's public base (host and scheme) instead, from which the shard builds
Location.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from functools import partial
from time import time
from typing import Any

import trio

from ds_cluster.common import bigjoin, wire
from ds_cluster.common.paths import PathError, stream_path_from_url
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import (
    Call,
    Delivered,
    ShardError,
    ShardPool,
    ShardTimeout,
    ShardUnavailable,
)
from ds_cluster.gateway import route as routes
from ds_cluster.gateway.answers import Answer, NativeAnswer, body_too_large, error_answer
from ds_cluster.gateway.auth import Denied
from ds_cluster.gateway.auth_files import AuthFiles
from ds_cluster.gateway.body_cache import DEFAULT_BYTES, BodyCache
from ds_cluster.gateway.budget import OUTPUT_STATE, UNLIMITED, WRITE_TIMEOUT
from ds_cluster.gateway.collapse import Collapser
from ds_cluster.gateway.fanout import QueuedSubscriber, SseFanout, Streaming, Subscriber
from ds_cluster.gateway.framing import header_lines
from ds_cluster.gateway.headers import DROPPED, NO_STORE, PREFLIGHT, TRANSPORT
from ds_cluster.gateway.reserved import ReservedRoutes, is_reserved, own_credentials
from ds_cluster.gateway.route import Route, RouteConfig, native_kind

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_RETRY_AFTER = (b"retry-after", b"1")
MAX_ROUTES = 1024  # request heads whose route is remembered (`StreamHandler.route`)
MAX_ROUTE_HEAD = 2048  # bytes of target and headers remembered so (more: decided each time)
_NO_LENGTH_STATUS = frozenset({204, 304})
# What every response from a shard ends with when the shard set no Cache-Control.
_TRANSPORT_NO_STORE = (*TRANSPORT, NO_STORE)
_TRANSPORT_LINES = header_lines(TRANSPORT)  # the same, as header lines
_TRANSPORT_NO_STORE_LINES = header_lines(_TRANSPORT_NO_STORE)
# An append's answer's header lines (`_rendered_answer`): its offset, the line's end and
# the transport headers (the shard sets no Cache-Control there).
_OFFSET_LINE = b"stream-next-offset: "
_END_TRANSPORT_NO_STORE = b"\r\n" + _TRANSPORT_NO_STORE_LINES
_new = object.__new__
# Route kinds forwarded as one request/response exchange with the owning shard.
_EXCHANGED = frozenset({routes.APPEND, routes.READ, routes.HEAD, routes.CREATE, routes.DELETE})
# Route kinds the gateway answers itself, and those no client token gates.
_ANSWERED_HERE = frozenset({routes.REFUSED, routes.PREFLIGHT, routes.NOT_OURS})
_UNGATED = _ANSWERED_HERE
# err codes from a shard -> (HTTP status, retry-after?). Retry-After only where the shard
# says it did not run the request: "unavailable" (its storage refused the write before
# anything was stored), and the ring's codes, which the pool retried for a while already
# (`ShardPool.open_routed`): a ring change never shows the client a 421 or any 4xx.
_ERROR_STATUS = {
    "bad_request": (400, False),
    "misdirected": (503, True),
    "unavailable": (503, True),
    "version": (503, True),
    "moving": (503, True),
    "internal": (500, False),
}


def _body_not_held() -> Answer:
    """The answer to a shard's `hit` on a token the gateway sent no body for (or holds no
    longer): the shard meant a body nobody here can serve."""
    return error_answer(502, "the shard answered with a body the gateway does not hold")


# What `StreamHandler.send_append` needs of an append's head (`plain_append`): its route,
# the frame's fields but the body, its stream path and its packed head (`Route.head`).
PlainAppend = tuple[Route, dict[str, Any], str, bytes]


class SentAppend:
    """A plain append sent to its owner without waiting for the answer
    (`StreamHandler.send`): its rendered answer goes to `arrived` from the shard
    connection's reader; `StreamHandler.settle` awaits it instead when that could not
    be (or was not) done."""

    __slots__ = ("arrived", "body", "fields", "path", "routed")

    # (No `__init__`: `StreamHandler.send_append` sets them. Python 3.11 runs a class's
    # own `__init__` through a slow generic call, and one is made per append.)
    path: str
    # Kept for a retry on a ring change (`open_routed`): the frame's fields but the body
    # (`plain_append`'s, shared by every request with this head) and the body.
    fields: dict[str, Any]
    body: bytes
    arrived: Callable[[NativeAnswer | None], bool]
    routed: tuple[Ring, Call]  # (`ShardPool.send_routed`'s)

    def first(self, item: Delivered) -> bool:
        """The call's first item: a complete answer is rendered and handed on; anything
        else (an error, a ring change, a lost connection) is None: `settle` it. True
        when `arrived` served it (the call is then done with: `Call.first`)."""
        answer: NativeAnswer | None = None
        if (
            type(item) is dict
            and item["k"] == "res"
            and not item["more"]
            and not item["hit"]  # (`_exchange`'s 502)
        ):
            try:
                pairs = item["h"]
                if item["s"] == 204 and len(pairs) == 1 and pairs[0][0] == "stream-next-offset":
                    # An append's answer (`_rendered_answer`'s first case, written out: a
                    # call costs 700 instructions, and this is every append's).
                    line = _OFFSET_LINE + pairs[0][1].encode() + _END_TRANSPORT_NO_STORE
                    answer = 204, line, item["b"]
                else:
                    answer = _rendered_answer(item, "POST")
            except Exception:  # `settle` meets it again, and answers 500
                answer = None
        return self.arrived(answer)


class _ClientGone(Exception):
    """The HTTP client disconnected while we were waiting."""


def _whole_answer(res: wire.ResponseFrame, method: str = "GET") -> Answer:
    """A shard's complete `res` rendered for the client."""
    status = res["s"]
    body = res.get("b") or b""
    return status, _response_headers(res.get("h") or (), method, status, len(body)), body


def _rendered_answer(res: wire.ResponseFrame, method: str) -> NativeAnswer:
    """`_whole_answer` with its headers rendered as header lines (the native route's)."""
    status = res["s"]
    body = res.get("b") or b""
    pairs = res.get("h") or ()
    if status == 204 and len(pairs) == 1:
        # An append's answer (`wire.append_answer`): its offset, no body to state.
        ((name, value),) = pairs
        if name == "stream-next-offset":
            return 204, _OFFSET_LINE + value.encode() + _END_TRANSPORT_NO_STORE, body
    lines: list[bytes] = []
    has_cache = has_length = False
    names = _LINE_NAMES
    for name, value in pairs:
        start = names.get(name, b"")
        if start == b"":
            start = _line_name(name)
        if start is None:
            continue
        if start == b"cache-control: ":
            has_cache = True
        elif start == b"content-length: ":
            has_length = True
        lines.append(b"%b%b\r\n" % (start, value.encode()))
    lines.append(_TRANSPORT_LINES if has_cache else _TRANSPORT_NO_STORE_LINES)
    if not has_length and _needs_length(method, status):
        lines.append(b"content-length: %d\r\n" % len(body))
    return status, b"".join(lines), body


def _stream_head(res: wire.ResponseFrame) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The response head of a streamed (SSE) `res`."""
    return res["s"], _response_headers(res.get("h") or (), "GET", res["s"], None)


_PREFLIGHT_ANSWER: Answer = (
    204,
    [(b"content-length", b"0"), NO_STORE, *TRANSPORT, *PREFLIGHT],
    b"",
)


UNKNOWN_OUTCOME = (
    "the outcome is unknown: the shard may have applied the request. Retrying is safe for "
    "reads and for appends from an idempotent producer (Producer-Id, -Epoch, -Seq)"
)


def failure_answer(exc: ShardUnavailable | ShardError) -> Answer:
    """What the client gets when the shard could not answer. 503 + Retry-After only when
    the request certainly did not run (a retry cannot apply it twice); when it may have
    run, 502 (connection lost) or 504 (timed out), without Retry-After."""
    if isinstance(exc, ShardUnavailable):
        if not exc.sent:
            return error_answer(
                503, f"shard unavailable ({exc.reason}); the request was not sent", (_RETRY_AFTER,)
            )
        if isinstance(exc, ShardTimeout):
            return error_answer(504, f"shard timed out ({exc.reason}); {UNKNOWN_OUTCOME}")
        return error_answer(502, f"shard connection lost ({exc.reason}); {UNKNOWN_OUTCOME}")
    status, retry = _ERROR_STATUS.get(exc.code, (502, False))
    if not retry:
        return error_answer(status, exc.msg or exc.code)
    seconds = math.ceil(exc.retry_after) if exc.code == "moving" else 1
    retry_after = _RETRY_AFTER if seconds <= 1 else (b"retry-after", str(seconds).encode())
    return error_answer(status, exc.msg or exc.code, (retry_after,))


def _own_credentials(method: str, path: str) -> bool:
    """A reserved route that carries its own credentials (`reserved.own_credentials`),
    never a stream whose path merely looks like one (`orders/subscriptions/x/ack`)."""
    return is_reserved(path) and own_credentials(method, path)


def denied_answer(denied: Denied) -> Answer:
    """A refused token's 401 / 403, with its `WWW-Authenticate` challenge."""
    challenge = (b"www-authenticate", denied.www_authenticate.encode())
    return error_answer(denied.status, denied.message, (challenge,))


async def send_answer(send: Send, answer: Answer) -> None:
    status, headers, body = answer
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    await send_answer(send, error_answer(status, message, extra))


# A shard's header name -> the name the client gets (lowercase bytes), or None when the
# gateway drops it; filled as names are seen (a shard sends a few dozen distinct ones).
_HEADER_NAMES: dict[str, bytes | None] = {}
MAX_HEADER_NAMES = 1024  # a bound, should a shard ever send made-up names


def _header_name(name: str) -> bytes | None:
    lname = name.lower()
    key = None if lname in DROPPED else lname.encode()
    if len(_HEADER_NAMES) < MAX_HEADER_NAMES:
        _HEADER_NAMES[name] = key
    return key


# The same names as the start of their header line (b"name: "), for `_rendered_answer`.
_LINE_NAMES: dict[str, bytes | None] = {}


def _line_name(name: str) -> bytes | None:
    key = _header_name(name)
    start = None if key is None else key + b": "
    if len(_LINE_NAMES) < MAX_HEADER_NAMES:
        _LINE_NAMES[name] = start
    return start


def _needs_length(method: str, status: int) -> bool:
    """Whether a complete answer with `status` to `method` states its body's length."""
    return status >= 200 and status not in _NO_LENGTH_STATUS and method != "HEAD"


def _response_headers(
    pairs: list[list[str]] | tuple[()], method: str, status: int, length: int | None
) -> list[tuple[bytes, bytes]]:
    """The shard's headers as byte pairs, plus transport headers and, for a complete
    body, a Content-Length when the shard gave none."""
    out: list[tuple[bytes, bytes]] = []
    has_cache = has_length = False
    names = _HEADER_NAMES
    for name, value in pairs:
        key = names.get(name, b"")
        if key == b"":
            key = _header_name(name)
        if key is None:
            continue
        if key == b"cache-control":
            has_cache = True
        elif key == b"content-length":
            has_length = True
        out.append((key, value.encode()))
    out += TRANSPORT if has_cache else _TRANSPORT_NO_STORE
    if length is not None and not has_length and _needs_length(method, status):
        out.append((b"content-length", b"%d" % length))
    return out


class StreamHandler:
    """ASGI callable for paths under /v1/stream/, and the native route's `NativeRoute`.
    Both ask `gateway.route.route()` what a request means, then act on it here."""

    def __init__(
        self,
        pool: ShardPool,
        ring: Ring,
        max_body_bytes: int,
        nursery: trio.Nursery,
        public_url: str = "",
        auth: AuthFiles | None = None,
        body_cache_bytes: int = DEFAULT_BYTES,
    ) -> None:
        """`nursery`: gateway-lifetime nursery for the shard calls that live reads share.
        `public_url`: scheme://host[:port] clients reach the gateway at (Location).
        `auth`: when given, every stream request needs a token that covers it.
        `body_cache_bytes`: the budget of large catch-up bodies kept (0: none)."""
        self.pool = pool
        self.auth = auth
        self.bodies = BodyCache(body_cache_bytes)
        pool.adopt(ring)  # the pool routes on the newest ring it has seen, this one or later
        self.max_body_bytes = max_body_bytes
        scheme, _, host = public_url.partition("://")
        host = host.rstrip("/")
        public = (("host", host), ("x-forwarded-proto", scheme)) if host else ()
        self.config = RouteConfig(max_body_bytes, public, auth is not None)
        # (method, target, *headers) -> `routes.route` of them, for heads seen lately;
        # emptied when full. At most MAX_ROUTES heads of at most MAX_ROUTE_HEAD bytes.
        self._routes: dict[tuple[Any, ...], Route] = {}
        self.reserved = ReservedRoutes(pool, lambda: self.ring, public_url, failure_answer)
        # Reads only (a GET is safe to retry), when the gateway stops under them.
        stopping = error_answer(503, "gateway stopping", (_RETRY_AFTER,))
        self.collapser = Collapser(nursery, self._fetch, stopping)
        self.fanout = SseFanout(
            nursery, self._open_sse, _stream_head, _whole_answer, failure_answer, stopping
        )

    @property
    def ring(self) -> Ring:
        """The newest ring (the pool's: it follows the shards' answers)."""
        return self.pool.ring

    def route(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> Route:
        """What the request means (`gateway.route`), with the client's token checked: a
        token that does not cover it makes it a REFUSED route (401 / 403)."""
        route = self._pure_route(method, target, headers)
        if (
            self.auth is not None
            and route.kind not in _UNGATED
            and not _own_credentials(method, route.path)
        ):
            return self._authorize(route) or route
        return route

    def _pure_route(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> Route:
        """`routes.route` of the request, remembered: it is a pure function of the request
        line and headers (and of the config, fixed here), a client sends the same head to
        the same stream again and again, and a lookup costs a fraction of deciding it."""
        key = (method, target, *headers)
        keep = True
        try:
            route = self._routes.get(key)
        except TypeError:  # an ASGI server's header pairs as lists: decided each time
            route = None
            keep = False
        if route is None:
            route = routes.route(method, target, headers, self.config)
            size = len(target) + sum([len(name) + len(value) for name, value in headers])
            if keep and size <= MAX_ROUTE_HEAD:
                if len(self._routes) >= MAX_ROUTES:
                    self._routes.clear()
                self._routes[key] = route
        return route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope["query_string"]
        target = raw_path + b"?" + query if query else raw_path
        route = self.route(scope["method"], target, scope["headers"])
        del target
        kind = route.kind
        if kind in _ANSWERED_HERE:
            return await send_answer(send, self._answered_here(route))
        body = await self._read_body(receive, send)
        if body is None:
            return
        if kind == routes.CONTROL:
            return await send_answer(send, await self._control(route, body))
        if kind != routes.LONG_POLL and kind != routes.SSE:
            return await send_answer(send, await self._call(route, body))
        if kind == routes.LONG_POLL:
            until_gone = partial(_until_disconnect, receive)
            answer = await self.collapser.wait(route.key, (route, body), until_gone)
            if answer is not None:
                await send_answer(send, answer)
            return
        # SSE: a shared upstream of raw bytes (unless the route gives no key).
        output = scope.get("state", {}).get(OUTPUT_STATE) or UNLIMITED.connection()
        del scope  # an SSE may be held long
        sub = QueuedSubscriber(output)
        result = await self.fanout.join(route.key, route.path, route.fields(body), sub, False)
        del route, body
        if not isinstance(result, Streaming):
            return await send_answer(send, result)
        await self._relay_sse(result, sub, receive, send)

    async def answer(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        until_gone: Callable[[], Awaitable[None]],
        write_at_once: Callable[[Answer], None] | None = None,
    ) -> NativeAnswer | None:
        """The whole answer to a request `takes` accepted: what the native route
        (`gateway.native`) calls, with no ASGI. A long-poll waits here, collapsed with its
        identical peers, and its answer goes to `write_at_once` from the group's task; None
        if its client leaves first (`until_gone` returns)."""
        route = self.route(method, target, headers)
        kind = route.kind
        if kind in _EXCHANGED:
            res = await self._exchange(route, body)
            return res if isinstance(res, tuple) else _rendered_answer(res, route.method)
        if kind == routes.LONG_POLL:
            return await self.collapser.wait(route.key, (route, body), until_gone, write_at_once)
        if kind == routes.CONTROL:
            return await self._control(route, body)
        if kind in _ANSWERED_HERE:
            return self._answered_here(route)
        # An SSE read or a path outside the prefix: `takes` sends neither here.
        return error_answer(500, f"{kind} request on the whole-answer route")

    async def stream(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        subscriber: Subscriber,
    ) -> Streaming | Answer:
        """An SSE read `takes` accepted as "stream", served from a shared upstream
        (`gateway.fanout`): how the response starts, or the whole answer when it does not
        stream (a 404, a bad offset)."""
        route = self.route(method, target, headers)
        if route.kind != routes.SSE:
            return self._answered_here(route)
        return await self.fanout.join(route.key, route.path, route.fields(body), subscriber)

    def send(
        self,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        arrived: Callable[[NativeAnswer | None], bool],
    ) -> SentAppend | None:
        """A POST sent to its owner at once when it is a plain append and the owner's
        connection takes it now; its answer goes to `arrived` (`SentAppend`). None: not
        sent, `answer` serves the request."""
        plain = self.plain_append(target, headers)
        return None if plain is None else self.send_append(plain, body, arrived)

    def plain_append(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> PlainAppend | None:
        """What `send_append` needs of a POST with this head when it is an append, before
        any token check: a pure function of the head, which the caller may keep for the
        same head and hand to `send_append` with each body. None: not an append."""
        route = self._pure_route("POST", target, headers)
        if route.kind != routes.APPEND:
            return None
        return route, route.fields(b""), route.path, route.head

    def send_append(
        self, plain: PlainAppend, body: bytes, arrived: Callable[[NativeAnswer | None], bool]
    ) -> SentAppend | None:
        """`send` of a POST whose head `plain_append` took: the client's token is checked
        here, per request, as `route` does. None: not sent (a refused token, or the
        owner's connection does not take it now), `answer` serves it."""
        route, fields, path, head = plain
        if self.auth is not None and self._authorize(route) is not None:
            return None
        sent = _new(SentAppend)
        sent.path = path
        sent.fields = fields
        sent.body = body
        sent.arrived = arrived
        # (The packed head and the body make the frame: no fields of its own are built.)
        routed = self.pool.send_routed(path, "http", fields, sent.first, head, body)
        if routed is None:
            return None
        sent.routed = routed
        return sent

    async def settle(self, sent: SentAppend) -> NativeAnswer:
        """The answer to an append `send` sent, awaited from here on (as `answer` would)."""
        fields = {**sent.fields, "b": sent.body}  # (for a retry: this request's own)
        res = await self._response(sent.path, fields, sent=sent.routed)
        if isinstance(res, tuple):
            return res
        if res["hit"]:
            return _body_not_held()
        return _rendered_answer(res, "POST")

    def abandon(self, sent: SentAppend) -> None:
        """Leave an append `send` sent (its client is gone): the shard is told to stop."""
        call = sent.routed[1]
        call.first = None
        call.close()

    @staticmethod
    def error(status: int, message: str) -> Answer:
        return error_answer(status, message)

    def refuse(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Answer | None:
        """With client auth on, what the route answers a request whose body is still to
        come, so that the native route reads no body for a refused client (ASGI requests
        are checked before their body anyway). None: read the body and go on."""
        if self.auth is None:
            return None
        route = self.route(method, target, headers)
        return self._answered_here(route) if route.kind in _ANSWERED_HERE else None

    @staticmethod
    def takes(method: str, target: bytes) -> str | None:
        """How the native route serves this request (`gateway.route.native_kind`):
        "answer", "stream" or None (left to ASGI)."""
        return native_kind(method, target)

    @staticmethod
    def _answered_here(route: Route) -> Answer:
        """The gateway's own answer to a route it does not forward."""
        if route.kind == routes.PREFLIGHT:
            return _PREFLIGHT_ANSWER
        if route.kind == routes.REFUSED:
            return error_answer(route.status, route.message, route.extra)
        return error_answer(404, "not a stream path")

    async def _control(self, route: Route, body: bytes) -> Answer:
        """A reserved `__ds` route. The Authorization header goes to the owner only where it
        carries the subscription's own token (callback, ack, release): a client's token
        never leaves the gateway."""
        method, path = route.method, route.path
        authorization = route.authorization if _own_credentials(method, path) else None
        return await self.reserved.answer(method, path, authorization, body)

    def _authorize(self, route: Route) -> Route | None:
        """None when the client's token covers the request; else a REFUSED route (its
        401 / 403 with the `WWW-Authenticate` challenge)."""
        assert self.auth is not None
        fork_source = None
        if route.method == "PUT":
            for key, value in route.forwarded:
                if key == "stream-forked-from":
                    with contextlib.suppress(PathError):  # the shard answers 400
                        fork_source = stream_path_from_url(value.strip())
        decision = self.auth.current().decide(
            route.method, route.path, route.authorization, fork_source, time()
        )
        if type(decision) is not Denied:
            return None
        challenge = (b"www-authenticate", decision.www_authenticate.encode())
        return route._replace(
            kind=routes.REFUSED,
            status=decision.status,
            message=decision.message,
            extra=(challenge,),
        )

    async def _call(self, route: Route, body: bytes) -> Answer:
        """The owner of the route's path's whole answer (a ring change or a move on the
        way is retried by `open_routed`)."""
        res = await self._exchange(route, body)
        return res if isinstance(res, tuple) else _whole_answer(res, route.method)

    async def _exchange(self, route: Route, body: bytes) -> wire.ResponseFrame | Answer:
        """The shard's complete response, or the error to answer when there is none. A
        catch-up GET carries the token of the body kept for it, if any (`_kept_body`)."""
        fields = route.fields(body)
        key: tuple[str, bytes] | None = None
        held: tuple[bytes, bytes] | None = None
        if route.kind == routes.READ and route.method == "GET" and self.bodies.enabled:
            key = (route.path, route.query)
            held = self.bodies.get(key)
            if held is not None:
                fields["t"] = held[0]
        res = await self._response(route.path, fields)
        if isinstance(res, tuple):
            return res
        if key is not None:
            return self._kept_body(res, key, held)
        if res["hit"]:
            return _body_not_held()
        return res

    def _kept_body(
        self, res: wire.ResponseFrame, key: tuple[str, bytes], held: tuple[bytes, bytes] | None
    ) -> wire.ResponseFrame | Answer:
        """A catch-up answer with its body: the one kept under `key` when the shard said
        so (`hit`: the token sent is the body's), else the shard's, kept when it is named.
        `held` is what was kept when the request went (the cache may have moved since)."""
        bodies = self.bodies
        token = res["t"]
        if res["hit"]:
            if held is None or token != held[0]:
                return _body_not_held()
            bodies.hits += 1
            res["b"] = held[1]
            return res
        if held is not None:
            bodies.misses += 1
        if res["s"] >= 400:
            bodies.drop(key)  # gone, or an error: stop asking with that token
        elif token and res["s"] == 200:
            bodies.put(key, token, res["b"])
        return res

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or None once an error was sent / the client left."""
        limit = self.max_body_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # http.disconnect
            data = message.get("body", b"")
            if data:
                size += len(data)
                if size > limit:
                    await send_error(send, 413, body_too_large(limit))
                    return None
                parts.append(data)
            if not message.get("more_body", False):
                break
        if not parts:
            return b""
        return await bigjoin.join(parts, size)  # a large body is copied off the loop

    @staticmethod
    async def _relay_sse(
        streaming: Streaming, sub: QueuedSubscriber, receive: Receive, send: Send
    ) -> None:
        """An SSE response on the ASGI path: the head, the upstream's bytes as `sub`
        queues them, until the upstream ends (the response ends), the client leaves or
        falls too far behind (`sub` is dropped: the response is left unfinished, so the
        server closes the connection, or resets the HTTP/2 stream; the client resumes
        from its last offset)."""

        async def pump() -> None:
            with sub.scope:
                head = {"type": "http.response.start", "status": streaming.status}
                await send({**head, "headers": streaming.headers})
                if streaming.prefix:
                    prefix = streaming.prefix
                    await send({"type": "http.response.body", "body": prefix, "more_body": True})
                while (frame := await sub.next()) is not None:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                    sub.sent(frame)

        try:
            await _unless_disconnected(receive, pump)
        except _ClientGone:
            return
        finally:
            streaming.leave()
        if not sub.dropped:
            with trio.move_on_after(WRITE_TIMEOUT):
                await send({"type": "http.response.body", "body": b""})

    async def _open_sse(self, path: str, fields: dict[str, Any]) -> Call:
        return await self.pool.open_routed(path, "http", fields)

    async def _fetch(self, request: tuple[Route, bytes], early: Callable[[Answer], None]) -> Answer:
        """One long-poll upstream, rendered once for every client sharing it, and handed
        to `early` by the shard connection's reader as it arrives (the clients' writes
        then go from that task, a scheduler pass sooner); else as `_call` answers."""
        route, body = request
        method = route.method
        rendered: list[Answer] = []

        def arrived(res: wire.ResponseFrame) -> None:
            rendered.append(_whole_answer(res, method))
            early(rendered[0])

        res = await self._response(route.path, route.fields(body), arrived)
        if rendered:
            return rendered[0]
        return res if isinstance(res, tuple) else _whole_answer(res, method)

    async def _response(
        self,
        path: str,
        fields: dict[str, Any],
        early: Callable[[wire.ResponseFrame], None] | None = None,
        sent: tuple[Ring, Call] | None = None,
    ) -> wire.ResponseFrame | Answer:
        """The owner's complete `res` to one http call (a ring change or a move on the way
        is retried by `open_routed`; `early` and `sent` as there), or the error to answer
        instead."""
        try:
            call = await self.pool.open_routed(path, "http", fields, early=early, sent=sent)
            try:
                res = await call.response()
            finally:
                call.close()  # a cancel to the shard if the response is not complete
        except (ShardUnavailable, ShardError) as exc:
            return failure_answer(exc)
        if res.get("more"):  # leaving `call` above already cancelled the stream
            return error_answer(502, "the shard streamed a body that cannot stream")
        return res


async def _until_disconnect(receive: Receive) -> None:
    """Return once the ASGI client has disconnected (request messages are dropped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(
    receive: Receive, fn: Callable[..., Awaitable[Any]], *args: Any
) -> Any:
    """Await fn(*args) while watching for the client's disconnect.

    Returns fn's result, re-raises its exception, or raises _ClientGone.
    """
    gone = False
    result: Any = None
    error: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            result = await fn(*args)
        except Exception as exc:  # handed to the caller outside the nursery
            error = exc
        nursery.cancel_scope.cancel()
    if gone:
        raise _ClientGone
    if error is not None:
        raise error
    return result
