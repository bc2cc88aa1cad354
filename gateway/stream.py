"""The lean handler for /v1/stream/*: validate, forward to the owning shard, write back
what it answers.

No framework on this path (a quart-trio route serves about half the requests/s of plain
ASGI on hypercorn-trio). The gateway holds no protocol semantics: it checks only what any
HTTP front end checks (path shape, method, body size, header well-formedness) and adds
transport headers; everything else is the shard's answer, passed through.

Three entries. `takes()` tells the native route (`gateway.native`) which requests it
serves; it then calls `answer()` for requests with one whole answer (long-polls included)
and `stream()` for SSE reads, straight from the HTTP/1.1 connection with no ASGI in
between. The ASGI `__call__` serves the rest (HTTP/2, HTTP/1.0 SSE, percent-encoded live
queries), the same way.

Client disconnects: only live reads can wait long, so only they watch their client (a
native long-poll watches its idle socket, an ASGI one its receive channel), and the shard
is sent `cancel` when the last client of a call leaves. Other requests are answered as
soon as the shard has decided (for writes: committed).

Sharing: identical long-polls in flight at the same time (same path, raw query string and
forwarded headers) share one shard call and one rendered answer (`gateway.collapse`); SSE
reads of the same key share one upstream (`gateway.fanout`), whose clients each have a
bounded backlog.

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
from typing import Any, NamedTuple, final
from urllib.parse import unquote_plus

import trio

from ds_cluster.common import bigjoin, wire
from ds_cluster.common.paths import PREFIX_BYTES, PathError, stream_path, stream_path_from_url
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import Call, ShardError, ShardPool, ShardTimeout, ShardUnavailable
from ds_cluster.gateway.answers import Answer, body_too_large, error_answer
from ds_cluster.gateway.auth import Denied
from ds_cluster.gateway.auth_files import AuthFiles
from ds_cluster.gateway.budget import OUTPUT_STATE, UNLIMITED, WRITE_TIMEOUT
from ds_cluster.gateway.collapse import Collapser
from ds_cluster.gateway.fanout import QueuedSubscriber, SseFanout, Streaming, Subscriber
from ds_cluster.gateway.headers import ALLOWED_METHODS, DROPPED, NO_STORE, PREFLIGHT, TRANSPORT
from ds_cluster.gateway.reserved import (
    RESERVED_PREFIX,
    ReservedRoutes,
    is_reserved,
    own_credentials,
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PREFIX_LEN = len(PREFIX_BYTES)
_ALLOWED = frozenset(ALLOWED_METHODS)
_ALLOW_HEADER = (b"allow", ", ".join(ALLOWED_METHODS).encode())
_RETRY_AFTER = (b"retry-after", b"1")
# The client's Host is not forwarded: Location is built from the gateway's public base.
_FORWARDED = {name.encode(): name for name in wire.FORWARDED_HEADERS if name != "host"}
_LIST_HEADERS = frozenset({"if-none-match"})  # may repeat; joined with ", "
_NO_LENGTH_STATUS = frozenset({204, 304})
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


class _ClientGone(Exception):
    """The HTTP client disconnected while we were waiting."""


@final  # so that `type(x) is _Checked` narrows both ways
class _Checked(NamedTuple):
    """A request that passed the gateway's checks: where it goes, what to forward."""

    path: str
    forwarded: list[list[str]]


def _whole_answer(res: wire.ResponseFrame, method: str = "GET") -> Answer:
    """A shard's complete `res` rendered for the client."""
    status = res["s"]
    body = res.get("b") or b""
    return status, _response_headers(res.get("h") or [], method, status, len(body)), body


def _stream_head(res: wire.ResponseFrame) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The response head of a streamed (SSE) `res`."""
    return res["s"], _response_headers(res.get("h") or [], "GET", res["s"], None)


def _share_key(checked: _Checked, query: bytes) -> tuple[Any, ...]:
    """What identical live reads share a shard call on: path, raw query, forwarded headers."""
    return (checked.path, query, *[(k, v) for k, v in checked.forwarded])


def _fields(checked: _Checked, method: str, query: bytes, body: bytes) -> dict[str, Any]:
    """The `http` RPC frame's fields."""
    return {
        "m": method,
        "p": checked.path,
        "q": query.decode("latin-1"),
        "h": checked.forwarded,
        "b": body,
    }


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


def _live_mode(query: bytes) -> str | None:
    """The `live` value the shard will read in this query (the last `live` wins; keys and
    values may be percent-encoded), or None."""
    if b"live" not in query and b"%" not in query:
        return None
    live = None
    for part in query.split(b"&"):
        key, _, value = part.decode("latin-1").partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if key == "live":
            live = unquote_plus(value) if "%" in value or "+" in value else value
    return live


def is_long_poll(query: bytes) -> bool:
    """Whether the shard will read this query as live=long-poll: such requests may share
    an answer."""
    return _live_mode(query) == "long-poll"


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


def _response_headers(
    pairs: list[list[str]], method: str, status: int, length: int | None
) -> list[tuple[bytes, bytes]]:
    """The shard's headers as byte pairs, plus transport headers and, for a complete
    body, a Content-Length when the shard gave none."""
    out: list[tuple[bytes, bytes]] = []
    has_cache = has_length = False
    for name, value in pairs:
        key = _HEADER_NAMES.get(name, b"")
        if key == b"":
            key = _header_name(name)
        if key is None:
            continue
        if key == b"cache-control":
            has_cache = True
        elif key == b"content-length":
            has_length = True
        out.append((key, value.encode()))
    out.extend(TRANSPORT)
    if not has_cache:
        out.append(NO_STORE)
    if (
        length is not None
        and not has_length
        and method != "HEAD"
        and status >= 200
        and status not in _NO_LENGTH_STATUS
    ):
        out.append((b"content-length", str(length).encode()))
    return out


class StreamHandler:
    """ASGI callable for paths under /v1/stream/."""

    def __init__(
        self,
        pool: ShardPool,
        ring: Ring,
        max_body_bytes: int,
        nursery: trio.Nursery,
        public_url: str = "",
        auth: AuthFiles | None = None,
    ) -> None:
        """`nursery`: gateway-lifetime nursery for the shard calls that live reads share.
        `public_url`: scheme://host[:port] clients reach the gateway at (Location).
        `auth`: when given, every stream request needs a token that covers it."""
        self.pool = pool
        self.auth = auth
        pool.adopt(ring)  # the pool routes on the newest ring it has seen, this one or later
        self.max_body_bytes = max_body_bytes
        scheme, _, host = public_url.partition("://")
        self.reserved = ReservedRoutes(pool, lambda: self.ring, public_url, failure_answer)
        self._public = (("host", host.rstrip("/")), ("x-forwarded-proto", scheme))
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        method = scope["method"]
        checked = self._check(method, raw_path, scope["headers"])
        if type(checked) is not _Checked:
            return await send_answer(send, checked)
        body = await self._read_body(receive, send)
        if body is None:
            return
        if is_reserved(checked.path):  # control routes before stream routes
            control = await self._control(method, checked.path, scope["headers"], body)
            return await send_answer(send, control)
        query = scope["query_string"]
        output = scope.get("state", {}).get(OUTPUT_STATE) or UNLIMITED.connection()
        del scope  # an SSE may be held long
        live = _live_mode(query) if method == "GET" else None
        if live not in ("long-poll", "sse"):  # any other live value: the shard refuses it
            return await send_answer(send, await self._exchange(checked, method, query, body))
        fields = _fields(checked, method, query, body)
        route = checked.path  # its owner is looked up at each try, on the newest ring
        if live == "long-poll":
            until_gone = partial(_until_disconnect, receive)
            key: tuple[Any, ...] | None = _share_key(checked, query)
            answer = await self.collapser.wait(key, route, fields, until_gone)
            if answer is not None:
                await send_answer(send, answer)
            return
        # SSE: a shared upstream of raw bytes; a read from "now" (percent-encoded or not)
        # starts where the stream is when asked, so it is not shared.
        key = None if b"%" in query or b"offset=now" in query else _share_key(checked, query)
        del checked, body
        sub = QueuedSubscriber(output)
        result = await self.fanout.join(key, route, fields, sub, framed=False)
        del fields
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
    ) -> Answer | None:
        """The whole answer to a request `takes` accepted: what the native route
        (`gateway.native`) calls, with no ASGI. A long-poll waits here, collapsed with its
        identical peers; None if its client leaves first (`until_gone` returns)."""
        path_part, _, query = target.partition(b"?")
        checked = self._check(method, path_part, headers)
        if type(checked) is not _Checked:
            return checked
        if is_reserved(checked.path):  # control routes before stream routes
            return await self._control(method, checked.path, headers, body)
        if method == "GET" and is_long_poll(query):
            fields = _fields(checked, method, query, body)
            key = _share_key(checked, query)
            return await self.collapser.wait(key, checked.path, fields, until_gone)
        return await self._exchange(checked, method, query, body)

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
        path_part, _, query = target.partition(b"?")
        checked = self._check(method, path_part, headers)
        if type(checked) is not _Checked:
            return checked
        fields = _fields(checked, method, query, body)
        key = None
        if b"offset=now" not in query:  # a read from "now" starts where the stream is
            key = _share_key(checked, query)
        return await self.fanout.join(key, checked.path, fields, subscriber)

    @staticmethod
    def error(status: int, message: str) -> Answer:
        return error_answer(status, message)

    def refuse(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Answer | None:
        """With client auth on, what `_check` answers a request whose body is still to
        come, so that the native route reads no body for a refused client (ASGI requests
        are checked before their body anyway). None: read the body and go on."""
        if self.auth is None:
            return None
        checked = self._check(method, target.partition(b"?")[0], headers)
        return checked if type(checked) is not _Checked else None

    @staticmethod
    def takes(method: str, target: bytes) -> str | None:
        """How the native route serves this request: "answer" (one whole answer, long-polls
        included), "stream" (an SSE read) or None (left to ASGI: anything outside the
        prefix, and a GET whose query is percent-encoded, parsed there the shard's way)."""
        if not target.startswith(PREFIX_BYTES):
            return None
        if method != "GET" or target.startswith(RESERVED_PREFIX):
            return "answer"
        query = target.partition(b"?")[2]
        if b"%" in query:
            return None
        return "stream" if _live_mode(query) == "sse" else "answer"

    def _check(
        self, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]]
    ) -> _Checked | Answer:
        """What any front end checks before forwarding: path shape, method, header
        well-formedness, declared size and, with auth on, the client's token (every path
        to a shard, native or ASGI, whole answer or shared live read, passes here). An
        error Answer, or what to forward."""
        try:
            path = stream_path(raw_path[PREFIX_LEN:])
        except PathError as exc:
            return error_answer(400, str(exc))
        if method not in _ALLOWED:
            return error_answer(405, "method not allowed", (_ALLOW_HEADER,))
        if method == "OPTIONS":
            return _PREFLIGHT_ANSWER
        # Forward only the protocol's headers, well-formed; note the declared length.
        forwarded: list[list[str]] = []
        declared = None
        authorization: bytes | None = None
        for name, value in headers:
            key = _FORWARDED.get(name)
            if key is not None:
                try:
                    text = value.decode("ascii")
                except UnicodeDecodeError:
                    return error_answer(400, f"header {key} is not ASCII")
                for pair in forwarded:
                    if pair[0] == key:
                        if key not in _LIST_HEADERS:
                            return error_answer(400, f"header {key} given twice")
                        pair[1] = f"{pair[1]}, {text}"
                        break
                else:
                    forwarded.append([key, text])
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return error_answer(400, "bad Content-Length")
            elif name == b"authorization" and self.auth is not None:
                if authorization is not None:
                    return error_answer(400, "header authorization given twice")
                authorization = value
        # Subscription callbacks, acks and releases carry the subscription's own token,
        # which its owner checks; the JWK Set is public.
        if self.auth is not None and not _own_credentials(method, path):
            refused = self._authorize(method, path, authorization, forwarded)
            if refused is not None:
                return refused
        if declared is not None and declared > self.max_body_bytes:
            return error_answer(413, body_too_large(self.max_body_bytes))
        if method == "PUT" and self._public[0][1]:  # creates: Location from the public base
            forwarded.extend([name, value] for name, value in self._public)
        return _Checked(path, forwarded)

    async def _control(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Answer:
        """A reserved `__ds` route. The Authorization header goes to the owner only where it
        carries the subscription's own token (callback, ack, release): a client's token
        never leaves the gateway."""
        if not _own_credentials(method, path):
            headers = []
        return await self.reserved.answer(method, path, headers, body)

    def _authorize(
        self, method: str, path: str, authorization: bytes | None, forwarded: list[list[str]]
    ) -> Answer | None:
        """None when the token covers the request; else its 401 / 403."""
        assert self.auth is not None
        fork_source = None
        if method == "PUT":
            for key, value in forwarded:
                if key == "stream-forked-from":
                    with contextlib.suppress(PathError):  # the shard answers 400
                        fork_source = stream_path_from_url(value.strip())
        decision = self.auth.current().decide(method, path, authorization, fork_source, time())
        if type(decision) is Denied:
            return denied_answer(decision)
        return None

    async def _exchange(self, checked: _Checked, method: str, query: bytes, body: bytes) -> Answer:
        """One request/response with the owning shard, rendered for the client."""
        fields = _fields(checked, method, query, body)
        return await self._call(checked.path, fields, method)

    async def _call(self, path: str, fields: dict[str, Any], method: str) -> Answer:
        """The owner of `path`'s whole answer (a ring change or a move on the way is
        retried by `open_routed`)."""
        try:
            async with await self.pool.open_routed(path, "http", fields) as call:
                res = await call.response()
        except (ShardUnavailable, ShardError) as exc:
            return failure_answer(exc)
        if res.get("more"):  # leaving `call` above already cancelled the stream
            return error_answer(502, "the shard streamed a body that cannot stream")
        return _whole_answer(res, method)

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

    async def _fetch(self, path: str, fields: dict[str, Any]) -> Answer:
        """One long-poll upstream, rendered once for every client sharing it."""
        return await self._call(path, fields, "GET")


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
