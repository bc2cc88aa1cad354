"""The gateway's HTTP/1.1 connections: llhttp parsing, our own socket, our own framing.

One task serves one connection, start to end. It reads the socket (a non-blocking
socket registered once with the server's `gateway.readiness`, which wakes the task when
bytes arrive; under TLS the connection's `trio.SSLStream`), feeds httptools'
`HttpRequestParser` (llhttp), and answers each request in order:

- stream requests the native route takes (`NativeRoute`, implemented by
  `gateway.stream.StreamHandler`) are answered inline: the whole body in, the whole answer
  out, as one socket write (a large body as a second write of its own, never copied
  behind the head). SSE reads join a shared upstream (`gateway.fanout`); the frames it
  delivers go straight to the socket, and this task writes what the socket did not take.
  A plain append (a POST whose body came in one piece, nothing read behind it, the
  connection kept after it, no TLS) is sent to its shard without this task awaiting the
  answer: the shard connection's reader writes it where it arrives (`_arrived`), and
  this task goes back to reading. It takes the append over (`_settle`) when the socket
  did not take the whole answer, a request arrives behind it, the client closes, the
  connection must close, or anything but a complete answer comes. Once a connection
  has been served and this task only waits for its next bytes, the server's readiness
  task reads them (`read_here`): when they are one whole plain append and nothing else,
  it parses and sends it on itself, exactly as this task would have, and this task
  sleeps on; anything else wakes this task with what was read (parsed or not), and it
  goes on from there. A read that is exactly a head llhttp parsed before as a plain
  append's and that head's Content-Length of body is not parsed again: it is sent on
  from what was kept of that parse (`gateway.plain_heads`, `read_here`);
- every other HTTP/1.1 request (control routes, /metrics, /healthz, percent-encoded live
  queries, SSE over HTTP/1.0) runs the ASGI app through a small driver here;
- HTTP/2 (the prior-knowledge preface, an `Upgrade: h2c` first request, ALPN "h2" under
  TLS) is handed, with the bytes already read, to hypercorn (`gateway.server`).

Keep-alive and pipelining: llhttp parses every request a read brought; they are answered
in order, and the next read happens only once they are (or while an append is in flight,
as above: what it brings is answered after that append). HTTP/1.0 and `Connection: close`
requests close after their answer, so does the connection's `keep_alive_max_requests`th.

Deadlines (what `gateway.server` lists): a new connection must send its first request
head within the keep-alive timeout, and any later head must be complete within it from
its first byte; between requests an answered connection waits `idle_timeout`; while an
append is in flight no read deadline runs (none did while its answer was awaited). A
request body must keep arriving (BODY_GRACE seconds, then BODY_MIN_RATE bytes/s on
average, never BODY_STALL seconds without a byte), else 408 and close. A write that the
socket takes no byte of for WRITE_TIMEOUT seconds drops the connection, and the bytes a
connection has queued count against its `gateway.budget`.

Limits: a head over MAX_HEAD bytes or MAX_HEADERS fields is answered 431, a malformed one
400, and a request with both Content-Length and Transfer-Encoding 400 (llhttp refuses it),
each then closed. A body over the route's limit is answered 413 (the route's error) at
once; the rest of the body is then read and dropped (DRAIN_LIMIT bytes within DRAIN_TIME
seconds) so the client reads the answer rather than a reset.

Shutdown: idle connections (and heads in progress) close at once; a request in progress
is answered with `Connection: close`.
"""

from __future__ import annotations

import logging
import os
import socket
from binascii import hexlify
from collections.abc import Awaitable, Callable
from math import inf
from random import getrandbits
from time import perf_counter, time
from typing import Any, Protocol
from urllib.parse import unquote

import httptools
import trio

from ds_cluster.common import bigjoin, tcp
from ds_cluster.gateway import framing
from ds_cluster.gateway import metrics as gateway_metrics
from ds_cluster.gateway.access import CLIENT_GONE, REQUEST_ID, AccessLog, given_or_new
from ds_cluster.gateway.answers import Answer, NativeAnswer, body_too_large, error_answer
from ds_cluster.gateway.budget import MAX_BEHIND, OUTPUT_STATE, WRITE_TIMEOUT, ConnectionOutput
from ds_cluster.gateway.fanout import Streaming, Subscriber
from ds_cluster.gateway.framing import header_lines
from ds_cluster.gateway.plain_heads import HEAD_END, PlainHeads
from ds_cluster.gateway.read_deadlines import ReadDeadlines
from ds_cluster.gateway.readiness import ReadReadiness
from ds_cluster.gateway.socket_writes import write_rest, write_tls

log = logging.getLogger(__name__)

MAX_RECV = 64 * 1024  # bytes one read takes from the socket
MAX_HEAD = 16 * 1024  # bytes of a request head (request line and header fields)
MAX_HEADERS = 100  # header fields of a request
SEPARATE_BODY_BYTES = 64 * 1024  # a body this large is written apart from its head
EARLY_CHECK_BYTES = 64 * 1024  # a request body larger is checked (`route.refuse`) at its head
BODY_GRACE = 5.0  # seconds a request body may take before its rate counts
BODY_MIN_RATE = 8 * 1024  # bytes/s a request body must average after the grace
BODY_STALL = 15.0  # seconds a request body may send nothing at all
# After an early answer (a 413, a refused token) the rest of the request body is read and
# dropped, at most this much for this long: closing a socket with unread bytes sends a TCP
# reset, and a client still sending then loses the answer it was sent.
DRAIN_LIMIT = 16 * 1024 * 1024
DRAIN_TIME = 10.0  # seconds
H2_PREFACE = b"PRI * HTTP/2.0"
_NO_CONTENT = framing.status_line(204)
_END = b"\r\n\r\n"  # (the last header line's end, and the head's)
_new = object.__new__
DEFAULT_MAX_BODY = 64 * 1024 * 1024  # request body limit when there is no stream route
_TOO_SLOW = "request body too slow"
_NO_HEADERS: list[tuple[bytes, bytes]] = []  # never appended to (see on_message_begin)
MAX_KINDS = 4096  # request lines whose `NativeRoute.takes` is remembered
MAX_KIND_TARGET = 512  # bytes of a target remembered so (a longer one is asked each time)
_UNKNOWN = "?"  # (not a kind)
# What `_receive` returns when the readiness task parsed what it read (`read_here`): told
# apart from bytes read by identity (a read never returns this very object).
_FED = bytes(bytearray(b"<parsed>"))


# What became of a plain append sent on without a task awaiting it (`_InFlight.state`).
_SENT = 0  # on its way: its answer is written where it arrives (`_arrived`)
_TASK = 1  # the connection's task must finish it (`_settle`)
_AWAITED = 2  # the connection's task awaits it (`_settle`), or it was abandoned
_REST = 3  # written in part where it arrived: the connection's task writes the rest


def body_deadline(since: float, received: int, last: float) -> float:
    """When a request body that began at `since` and has `received` bytes, the last at
    `last`, must have sent more."""
    return min(since + BODY_GRACE + received / BODY_MIN_RATE, last + BODY_STALL)


def _not_served(answer: NativeAnswer | None) -> bool:
    """`arrived` of a connection that has ended: nothing is written."""
    return False


class NativeRoute(Protocol):
    """Stream requests answered without ASGI: whole body in, whole answer out (or an SSE
    stream fed by `gateway.fanout`). `gateway.stream.StreamHandler` implements it."""

    max_body_bytes: int

    def takes(self, method: str, target: bytes) -> str | None:
        """How this route serves the request: "answer" (`answer`), "stream" (`stream`) or
        None (not at all: it goes to the ASGI app)."""

    async def answer(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        until_gone: Callable[[], Awaitable[None]],
        write_at_once: Callable[[Answer], None] | None = None,
    ) -> NativeAnswer | None:
        """The complete answer (its headers maybe rendered already, `NativeAnswer`), or
        None when the client left while it was awaited (the route learns that by awaiting
        `until_gone`, which returns when the client has closed its side). A route that
        learns the answer in another task (a collapsed long-poll) may hand it to
        `write_at_once` there before returning it. Must not raise for bad input (an error
        Answer instead)."""

    async def stream(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        subscriber: Subscriber,
    ) -> Streaming | Answer:
        """Start a streamed response fed to `subscriber` (`gateway.fanout`), or the
        complete answer when there is nothing to stream."""

    def send(
        self,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        arrived: Callable[[NativeAnswer | None], bool],
    ) -> Any:
        """Send a POST on when it is a plain append, without awaiting its answer: the
        answer goes to `arrived` (None: `settle` must be awaited instead) from the task
        that learns it, which returns True when it served it (`settle` is not called
        then). A handle for `settle` and `abandon`, or None: not sent, `answer` serves
        the request."""

    def plain_append(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
        """What `send_append` needs of a POST with this head when it is a plain append,
        before any check that depends on more than the head (None: it is not one)."""

    def send_append(
        self, plain: Any, body: bytes, arrived: Callable[[NativeAnswer | None], bool]
    ) -> Any:
        """`send` of a POST whose head `plain_append` accepted (the per-request checks
        made here)."""

    async def settle(self, sent: Any) -> NativeAnswer:
        """The answer to a request `send` sent, awaited."""

    def abandon(self, sent: Any) -> None:
        """The client of a request `send` sent is gone: its answer is not wanted."""

    def error(self, status: int, message: str) -> Answer:
        """An error rendered as the route renders its own (413, 500 from here)."""

    def refuse(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Answer | None:
        """An answer to give at the head of a request with a large body (or a chunked one),
        before the body is read (a refused client token), or None to read it and go on."""


HandOver = Callable[[Any, bytes], Awaitable[None]]


class Http1Server:
    """What every connection of one server shares: settings, the route, the app."""

    __slots__ = (
        "_lines",
        "_lines_of",
        "second",
        "second_end",
        "second_lines",
        "access",
        "app",
        "between",
        "config",
        "connections",
        "context",
        "deadlines",
        "readiness",
        "hand_over",
        "keep_alive",
        "kinds",
        "max_body_bytes",
        "now",
        "max_requests",
        "output",
        "plain_heads",
        "route",
        "state",
        "stopping",
        "tls_close_timeout",
    )

    def __init__(
        self,
        *,
        app: Callable[..., Awaitable[None]],
        config: Any,
        context: Any,
        state: dict[str, Any],
        route: NativeRoute | None,
        access: AccessLog | None,
        connections: Any,
        output: Any,
        hand_over: HandOver,
        tls_close_timeout: float,
        max_body_bytes: int,
    ) -> None:
        """`app`: the plain ASGI app (requests the route does not take); `config`:
        hypercorn's (`gateway.server.LeanConfig`); `context`: hypercorn's worker context
        (shutdown); `connections`: the registry of idle connections (closed at shutdown);
        `output`: the process's `gateway.budget.OutputBudget`; `hand_over(stream, bytes)`
        serves an HTTP/2 connection with hypercorn, the bytes already read first."""
        self.app = app
        self.config = config
        self.context = context
        # Whether the server is shutting down: set by `gateway.server` as it sets the
        # worker context's `terminated` (read twice per request: a flag, not two calls).
        self.stopping = False
        self.state = state
        self.route = route
        self.access = access
        self.connections = connections
        self.output = output
        self.deadlines = ReadDeadlines()  # its `run` is the server's to start
        self.readiness = ReadReadiness()  # so is this one's
        self.hand_over = hand_over
        self.tls_close_timeout = tls_close_timeout
        self.keep_alive = float(config.keep_alive_timeout)  # a request head's limit
        self.between = float(getattr(config, "idle_timeout", self.keep_alive))
        self.max_requests = int(config.keep_alive_max_requests)
        self.max_body_bytes = route.max_body_bytes if route is not None else max_body_bytes
        # (method, target) -> `route.takes` (a pure function of them), for targets seen
        # lately: a gateway meets the same streams again and again. Emptied when full.
        self.kinds: dict[tuple[str, bytes], str | None] = {}
        # Heads of plain appends parsed before (`gateway.plain_heads`, `read_here`).
        self.plain_heads = PlainHeads()
        # trio's clock, read without `trio.current_time`'s two calls in between (twice a
        # request); set by the first connection, in the loop.
        self.now: Callable[[], float] = trio.current_time
        self._lines_of: object = None  # the extra headers list `_lines` renders
        self._lines = (b"", b"")  # its lines, without and with Connection: close
        # `shared_lines(False)` and the X-Request-Id header's name, for `_arrived`, which
        # renders them once per wall-clock second (the Date header's precision), the one
        # from `second` until `second_end`, without a call.
        self.second = self.second_end = -1.0
        self.second_lines = b""

    def error(self, status: int, message: str) -> Answer:
        route = self.route
        return route.error(status, message) if route is not None else error_answer(status, message)

    def extra_headers(self, close: bool) -> list[tuple[bytes, bytes]]:
        """The headers every response carries (Date), and Connection: close if `close`.
        (The list without close is shared: callers copy it before adding to it.)"""
        headers: list[tuple[bytes, bytes]] = self.config.response_headers("h11")
        return [*headers, framing.CLOSE] if close else headers

    def extra_lines(self, close: bool, rid: bytes) -> bytes:
        """`extra_headers(close)` and the request's X-Request-Id as header lines."""
        return self.shared_lines(close) + b"x-request-id: %b\r\n" % rid

    def shared_lines(self, close: bool) -> bytes:
        """`extra_headers(close)` as header lines, rendered once for as long as the
        config hands out the same list (a second, for `LeanConfig`), not once per
        answer."""
        headers = self.config.response_headers("h11")
        if headers is not self._lines_of:
            self._lines_of = headers
            lines = header_lines(headers)
            self._lines = (lines, lines + header_lines((framing.CLOSE,)))
        return self._lines[close]

    def renew_second_lines(self, now: float) -> bytes:
        """`second_lines` for the wall clock's second of `now`, now."""
        second = self.second = float(int(now))
        self.second_end = second + 1.0
        self.second_lines = self.shared_lines(False) + b"x-request-id: "
        return self.second_lines

    def serve(
        self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    ) -> Awaitable[None]:
        """Serve one accepted connection (`trio.serve_listeners`' handler; the coroutine
        itself, without a frame of this call kept under it for the connection's life).
        Every client connection passes here, HTTP/2 ones handed over later included."""
        tcp.allow_unsent(stream)  # a large body in few writes (common.tcp)
        return Http1Connection(self, stream).run()


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head that is over a limit."""


class _Request:
    """One request as parsed so far."""

    __slots__ = (
        "answered",
        "body_last",
        "body_since",
        "close",
        "complete",
        "continued",
        "drain_until",
        "early",
        "expect",
        "given_id",
        "headers",
        "keep_alive",
        "kind",
        "method",
        "parts",
        "size",
        "started",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.target = target
        self.headers = headers
        self.method = "GET"
        self.version = "1.1"
        self.keep_alive = True
        self.kind: str | None = None  # NativeRoute.takes: "answer", "stream", None (ASGI)
        self.parts: list[bytes] = []
        self.size = 0  # body bytes received
        self.complete = False  # the whole message is parsed
        self.early: Answer | None = None  # to answer before (or without) the body
        self.answered = False  # `early` is written; the rest of the body is dropped
        self.close = False  # close the connection after this request
        self.expect = False  # Expect: 100-continue
        self.continued = False  # 100 Continue sent
        self.upgrade = b""  # the Upgrade header
        self.given_id: bytes | None = None  # its first X-Request-Id (`access.given_or_new`)
        self.body_since = -1.0  # when its body began arriving (-1: no body in progress)
        self.body_last = 0.0
        self.drain_until = inf
        self.started = perf_counter()


class _InFlight:
    """A plain append sent on by `Http1Connection._send_on`, whose answer is written
    where it arrives (`_arrived`) rather than by the connection's task awaiting it."""

    __slots__ = (
        "answer",
        "received",
        "req",
        "rest",
        "rid",
        "sent",
        "series",
        "size",
        "started",
        "state",
        "status",
    )

    # (No `__init__`: `Http1Connection._fly` makes them. Python 3.11 runs a class's own
    # `__init__` through a slow generic call, and one is made per append.)
    # Its method, target and what `_closing` reads of it (for a request served from a
    # kept head, the request its head was first parsed into: only what the head decides
    # is read of it, never written).
    req: _Request
    started: float  # its head's arrival: the duration metric's start
    received: int  # its body's size (for the access log)
    rid: bytes
    sent: Any  # `NativeRoute.send`'s handle
    series: gateway_metrics.Series | None
    state: int
    answer: NativeAnswer | None  # arrived, for the task to write
    # Set (only) as the state becomes _REST, and read only in that state:
    rest: memoryview  # what the socket did not take
    size: int  # the body's size (for the access log)
    status: int  # the status written


class Http1Connection:
    """One client connection, served by the task that runs `run`."""

    __slots__ = (
        "_arrived_here",
        "_at_once",
        "_broken",
        "_fd",
        "_handed_over",
        "_head_bytes",
        "_inflight",
        "_kept_length",
        "_head_until",
        "_headers",
        "_idle_until",
        "_more",
        "_now",
        "_parser",
        "_queue",
        "_raw",
        "_read_scope",
        "_req",
        "_served",
        "_server",
        "_stopped",
        "_taken",
        "_unread",
        "_url",
        "_wake",
        "_wrote",
        "write_scope",
        "output",
        "read_task",
        "readable",
        "stream",
        "timer_at",
        "tls",
        "wait_until",
    )

    def __init__(
        self, server: Http1Server, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    ) -> None:
        self._server = server
        self.stream = stream
        self.tls = isinstance(stream, trio.SSLStream)
        self.output: ConnectionOutput = server.output.connection()
        self._fd = -1
        self._parser: Any = httptools.HttpRequestParser(self)
        # Parsed heads, answered in order (lists: an empty deque costs ten times the memory).
        self._queue: list[_Request] = []
        self._req: _Request | None = None  # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_until = inf  # the head in progress must be complete by then
        self._idle_until = inf  # while idle: when the connection times out
        # Bytes may be waiting in the socket: read before waiting (the last read filled
        # its buffer). Waits are edge-triggered (`gateway.readiness`): never wait on bytes
        # not tried.
        self._more = True
        self._served = 0  # requests answered
        self._now = 0.0  # trio's clock when the bytes being parsed were read (`_feed`)
        self._raw: bytes | None = b""  # bytes read until the first request is dispatched
        self._unread = b""  # under TLS: bytes read while watching for the client leaving
        # What the server's readiness task read for this task while it waited
        # (`read_here`): bytes to parse, or _FED (parsed already: answer the queue).
        self._taken: bytes | None = None
        self._read_scope: trio.CancelScope | None = None
        self.wait_until = inf  # the read in progress must end by then (`ReadDeadlines`)
        self.timer_at = inf  # when this connection's `ReadDeadlines` entry comes due
        self.read_task: trio.lowlevel.Task | None = None  # waiting in `ReadReadiness.wait`
        self.readable = False  # `ReadReadiness`: bytes came while nobody waited
        self.write_scope: trio.CancelScope | None = None
        self._wake: trio.CancelScope | None = None  # an SSE response's wait, woken by frames
        self._stopped = False  # dropped, or the server stops: no more reads or writes
        self._broken = False  # the parser cannot go on: answer what is queued, then close
        self._handed_over = False
        # The native request whose answer another task may write (`_write_at_once`), and
        # its request id; then what that write did: status, body size, close, unsent rest.
        self._at_once: tuple[_Request, bytes] | None = None
        self._wrote: tuple[int, int, bool, memoryview | None] | None = None
        # A plain append whose answer is written where it arrives (`_send_on`): while it
        # is in flight this task goes on reading, and answers nothing else before it.
        self._inflight: _InFlight | None = None
        # The body length of the last append served from a kept head (`read_here`).
        self._kept_length = 0
        # `_arrived` bound once (a bound method made per append otherwise); dropped as
        # the connection ends, with the parser (both refer back to it).
        self._arrived_here: Callable[[NativeAnswer | None], bool] = self._arrived

    # -- the connection ------------------------------------------------------------------

    async def run(self) -> None:
        server = self._server
        try:
            if self.tls:
                stream = self.stream
                assert isinstance(stream, trio.SSLStream)
                try:
                    with trio.fail_after(float(server.config.ssl_handshake_timeout)):
                        await stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError):
                    return
                if stream.selected_alpn_protocol() == "h2":
                    self._handed_over = True
                    return await server.hand_over(stream, b"")
                sock = stream.transport_stream.socket
            else:
                assert isinstance(self.stream, trio.SocketStream)
                sock = self.stream.socket
                server.readiness.watch(sock.fileno(), self)
            self._fd = sock.fileno()
            if server.now is trio.current_time:
                server.now = trio.lowlevel.current_clock().current_time
            self._set_idle(server.now() + server.keep_alive)
            # One scope for the connection's life, cancelled to drop the connection, or
            # by the server's `ReadDeadlines` when a read waits past its deadline.
            with trio.CancelScope() as scope:
                self._read_scope = scope
                await self._serve()
            self._read_scope = None
            if scope.cancelled_caught:
                await self._expired()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one connection's failure must never stop the server
            log.exception("connection handler failed")
        finally:
            if self._inflight is not None:
                self._abandon()
            server.connections.idle.discard(self)
            server.deadlines.forget(self)
            self.output.close()
            self._parser = None  # (it refers back to this object)
            self._arrived_here = _not_served  # (so does this)
            if self._fd >= 0:
                server.readiness.forget(self._fd, self)
            if not self._handed_over:
                await self._close()

    @property
    def dropped(self) -> bool:
        """Stopped (dropped, or the server stops): a write in progress gives up."""
        return self._stopped

    def read_expired(self) -> None:
        """A read waited past its deadline (`ReadDeadlines`): the connection ends
        (`_expired` answers a body that stopped arriving)."""
        scope = self._read_scope
        if scope is not None:
            scope.cancel()

    def stop_reading(self) -> None:
        """End this connection: at shutdown (while idle), or to drop it (a write in
        progress is abandoned too)."""
        self._stopped = True
        for scope in (self._read_scope, self.write_scope, self._wake):
            if scope is not None:
                scope.cancel()

    async def _close(self) -> None:
        if self.tls:
            with trio.move_on_after(self._server.tls_close_timeout):
                await self.stream.aclose()
        else:
            self.stream.socket.close()

    def _set_idle(self, until: float) -> None:
        self._idle_until = until
        self._server.connections.idle.add(self)

    async def _serve(self) -> None:
        """Answer the requests in order; read when all that was read is answered."""
        server = self._server
        queue = self._queue
        while True:
            while queue:
                if self._inflight is not None and not await self._settle():
                    return  # (answered before anything read after it)
                req = queue[0]
                if req.early is not None and not req.answered and not await self._answer_early(req):
                    return
                if not req.complete:
                    if req.expect and not req.continued and not req.answered:
                        req.continued = True
                        await self._write(framing.CONTINUE)
                    break
                del queue[0]
                if req.answered:  # early answer given, body dropped
                    if req.close:
                        return
                    continue
                if req.method == "POST" and req.kind == "answer" and self._send_on(req):
                    continue  # answered where its answer arrives (`_arrived`), or `_settle`d
                if not await self._dispatch(req):
                    return
            if self._stopped or self._broken:
                return
            data = await self._receive()
            if data is _FED:  # parsed by the readiness task (`read_here`): answer them
                continue
            if data is None:  # the append in flight needs this task
                if not await self._settle():
                    return
                continue
            if not data:
                if self._inflight is not None:
                    await self._settle()
                return  # the client closed (requests in progress were answered)
            raw = self._raw
            if raw is not None:  # nothing dispatched yet: the bytes are kept for hypercorn
                withheld = H2_PREFACE.startswith(raw)  # all of it so far, unparsed
                raw += data
                if raw.startswith(H2_PREFACE):  # HTTP/2 with prior knowledge
                    self._handed_over = True
                    server.connections.idle.discard(self)
                    server.readiness.forget(self._fd, self)
                    return await server.hand_over(self.stream, raw)
                if H2_PREFACE.startswith(raw):
                    self._raw = raw
                    continue  # maybe the preface: wait for more before parsing
                if withheld:
                    data = raw
                self._raw = raw if len(raw) <= MAX_HEAD else None
            if self._feed(data) == "h2c":
                self._handed_over = True
                server.connections.idle.discard(self)
                server.readiness.forget(self._fd, self)
                raw, self._raw = self._raw or b"", None
                return await server.hand_over(self.stream, raw)

    def _deadline(self) -> float:
        """When the read about to wait must have ended."""
        if self._inflight is not None:
            return inf  # an answer is awaited: no request's time runs (as none is read)
        req = self._req
        if req is None:
            return self._idle_until  # between requests
        if req.body_since < 0:
            return self._head_until  # a head in progress
        deadline = body_deadline(req.body_since, req.size, req.body_last)
        return min(deadline, req.drain_until)

    async def _receive(self) -> bytes | None:
        """The next bytes (b"" at the end), or None when the append in flight needs this
        task (`_settle`). Past the deadline of what the connection waits for, its scope
        is cancelled (everything read was answered by then) by the server's
        `ReadDeadlines`."""
        if self._unread:
            data, self._unread = self._unread, b""
            return data
        ready = self._more  # else the last read took all there was: wait first
        while True:
            taken = self._taken
            if taken is not None:  # read by the readiness task while this one waited
                self._taken = None
                return taken
            if ready and not self.tls:
                try:
                    data = os.read(self._fd, MAX_RECV)
                except BlockingIOError:
                    pass
                else:
                    self._more = len(data) == MAX_RECV
                    return data
            ready = True
            inflight = self._inflight
            if inflight is not None and inflight.state != _SENT:
                return None
            self._server.deadlines.wait(self, self._deadline())  # past it: `read_expired`
            try:
                if self.tls:
                    return bytes(await self.stream.receive_some(MAX_RECV))
                await self._server.readiness.wait(self)
            finally:
                self.wait_until = inf

    def read_here(self) -> bool:
        """Bytes may have come while this connection's task waits for them
        (`ReadReadiness.run`, from its task): when they are one whole plain append and
        nothing else, read, parse and send it on here (`_send_on`), as the connection's
        task would have, and let that task wait on (True). Anything else (a partial
        request, several, another kind, a full read, the end) is left for the task
        (False: it is woken): bytes read as they are, parsed ones as _FED, so that it
        goes on exactly where it would have."""
        if (
            self._raw is not None  # nothing dispatched yet (HTTP/2 is still possible)
            or self._inflight is not None  # what comes is answered after it: the task's
            or self._queue
            or self._req is not None
            or self._stopped
            or self._broken
            or self._taken is not None
            or self.tls
        ):
            return False
        try:
            data = os.read(self._fd, MAX_RECV)
        except BlockingIOError:
            return True  # (an event for bytes read already: the task would wait again)
        except OSError:
            return False  # the task's own read meets it
        try:
            if not data or len(data) == MAX_RECV:
                self._more = bool(data)
                self._taken = data
                return False
            self._more = False
            # Where the head ends: where the body length of this connection's last kept
            # head puts it when the blank line's two LFs are there (a client sends the
            # same size again and again: two byte compares where `find` cost 950
            # instructions, `endswith` 770), else found. (Only an exact kept head is
            # served: a wrong guess is a miss, parsed.)
            end = len(data) - self._kept_length
            if end < 4 or data[end - 1] != 10 or data[end - 3] != 10:
                end = data.find(HEAD_END) + 4
            # A kept head and its whole body: what llhttp and `_send_on` would do with
            # these bytes, without parsing them again (`gateway.plain_heads`). Written
            # out here (a call costs 700 instructions, and most appends come this way).
            server = self._server
            plain = server.plain_heads.heads.get(data[:end]) if end > 3 else None
            if plain is not None:
                req, route_plain, length = plain
                # (one after which the connection closes takes the general path)
                if len(data) - end == length and not self._closing(req):
                    route = server.route
                    assert route is not None
                    started = perf_counter()
                    try:
                        sent = route.send_append(route_plain, data[end:], self._arrived_here)
                    except Exception:
                        sent = None  # the general path meets it again
                    if sent is not None:
                        self._kept_length = length
                        # (What llhttp's callbacks leave of a whole message: the
                        # connection is busy. `_raw` is None already, as checked.)
                        server.connections.idle.discard(self)
                        server.plain_heads.hits += 1
                        self._fly(req, started, length, sent, None)
                        self.wait_until = inf  # (as below)
                        return True
            self._feed(data)
            queue = self._queue
            if len(queue) != 1 or self._req is not None or self._broken:
                self._taken = _FED
                return False
            req = queue[0]
            if not req.complete or req.early is not None or req.method != "POST":
                self._taken = _FED
                return False
            if req.kind != "answer":
                self._taken = _FED
                return False
            del queue[0]
            if self._send_on(req):
                # (`_deadline` while in flight: `ReadDeadlines.wait` of inf, which only
                # notes it, written out)
                self.wait_until = inf
                self._learn(req, data)
                return True
            queue.append(req)  # the task serves it (`_dispatch`)
            self._taken = _FED
            return False
        except Exception:  # the connection's failure, as it would have been in its task
            log.exception("connection handler failed")
            self.stop_reading()
            return True  # (the task is woken by its cancelled scope)

    async def _expired(self) -> None:
        """A read waited past its deadline (or the connection was dropped): a request
        whose body stopped arriving is answered 408; the connection then closes."""
        req = self._req
        if req is not None and req.body_since >= 0 and not self._stopped and not req.answered:
            status, headers, body = error_answer(408, _TOO_SLOW, (framing.CLOSE,))
            await self._write(framing.response_head(status, headers) + body)

    def _feed(self, data: bytes) -> str | None:
        """Parse `data`: complete heads join the queue. "h2c" when the connection's first
        request asks to upgrade to HTTP/2 (it goes to hypercorn with every byte read)."""
        begun = self._req is not None and self._req.body_since < 0 and self._req not in self._queue
        # One clock read for every parser callback this data makes (a head and a body
        # in one read: three reads otherwise).
        self._now = self._server.now()
        if self._parser is None:
            self._parser = httptools.HttpRequestParser(self)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            last = self._queue[-1] if self._queue else None
            if (
                last is not None
                and last.upgrade.lower() == b"h2c"
                and self._served == 0
                and len(self._queue) == 1
                and self._raw is not None
            ):
                return "h2c"
            # Any other upgrade is declined: the request is served as HTTP/1.1 and what
            # follows it parsed afresh.
            self._parser = httptools.HttpRequestParser(self)
            self._req = None
            rest = data[upgrade.args[0] :] if upgrade.args else b""
            if rest:
                return self._feed(rest)
            return None
        except httptools.HttpParserError as error:
            self._malformed(error)
            return None
        if begun and self._req is not None and self._req not in self._queue:
            self._head_bytes += len(data)  # all of this read belongs to the head
            if self._head_bytes > MAX_HEAD:
                self._refuse_head(431, "request head too large")
        return None

    def _malformed(self, error: Exception) -> None:
        """A parse error (or a refused head): answer it in turn, then close."""
        req = self._req
        self._req = None
        if isinstance(error, httptools.HttpParserCallbackError) and isinstance(
            error.__context__, _HeadRefused
        ):
            return  # already queued by _refuse_head
        message = f"malformed request: {error}"
        if req is not None and req in self._queue:  # broke in its body
            if not req.answered and req.early is None:
                req.early = error_answer(400, message)
            req.close = True
            req.complete = True
            self._broken = True
            return
        self._broken = True  # the parser cannot go on: nothing after it is read
        failed = _Request(b"", [])
        failed.early = error_answer(400, message)
        failed.close = failed.complete = True
        self._queue.append(failed)

    def _refuse_head(self, status: int, message: str) -> None:
        failed = _Request(b"", [])
        failed.early = error_answer(status, message)
        failed.close = failed.complete = True
        self._queue.append(failed)
        self._req = None
        self._broken = True  # nothing after it is read

    # -- parser callbacks (llhttp calls them from feed_data) -------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._req = _Request(b"", self._headers)
        until = self._now + self._server.keep_alive
        # A new connection's first head: within the keep-alive timeout of its connecting.
        self._head_until = until if self._served else min(self._idle_until, until)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD:
            self._refuse_head(431, "request head too large")
            raise _HeadRefused

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name.lower(), value))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD or len(headers) > MAX_HEADERS:
            self._refuse_head(431, "request head too large")
            raise _HeadRefused

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        parser = self._parser
        server = self._server
        req.target = self._url
        self._url = b""
        self._headers = _NO_HEADERS  # the request holds them (a new list comes per head)
        req.method = method = parser.get_method().decode("ascii")
        keep = parser.should_keep_alive()
        length = -1
        chunked = False
        connection = expect = False
        for name, value in req.headers:
            if name == b"content-length":
                length = int(value)  # llhttp checked it: digits, one value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
            elif name == b"upgrade":
                req.upgrade = value
            elif name == b"x-request-id" and req.given_id is None:
                req.given_id = value
            elif name == b"connection":
                connection = True
        # llhttp takes HTTP/0.9, 1.0, 1.1 and 2.0 only, and keeps alive any but 1.1 only
        # when a Connection header says so: kept alive without one is 1.1, without
        # asking the parser for its version (a string formatted anew each time).
        if keep and not connection:
            version = "1.1"
        else:
            version = parser.get_http_version()
            keep = keep and version == "1.1"
        req.version = version
        req.keep_alive = keep
        if expect and version == "1.1":
            req.expect = True
        route = server.route
        kinds = server.kinds
        kind = kinds.get((method, req.target), _UNKNOWN)
        if kind is _UNKNOWN:
            kind = route.takes(method, req.target) if route is not None else None
            if len(req.target) <= MAX_KIND_TARGET:
                if len(kinds) >= MAX_KINDS:
                    kinds.clear()
                kinds[(method, req.target)] = kind
        if kind == "stream" and version != "1.1":
            kind = None  # shared SSE frames are HTTP/1.1 chunks: the ASGI app serves it
        req.kind = kind
        limit = server.max_body_bytes
        if length > limit:
            req.early = server.error(413, body_too_large(limit))
        elif kind is not None and route is not None and (chunked or length > EARLY_CHECK_BYTES):
            req.early = route.refuse(method, req.target, req.headers)
        if req.early is not None and req.expect:
            req.close = True  # the client may send its body or not: nothing after it is sure
        if chunked or length > 0:
            req.body_since = req.body_last = self._now
        self._queue.append(req)
        self._server.connections.idle.discard(self)

    def on_body(self, body: bytes) -> None:
        req = self._req
        assert req is not None
        req.size += len(body)
        req.body_last = self._now
        if req.early is not None:
            if req.answered and (req.size > DRAIN_LIMIT or req.body_last > req.drain_until):
                req.drain_until = -inf  # not worth reading on: close once answered
                req.close = True
                req.complete = True
                self._broken = True
            return
        if req.size > self._server.max_body_bytes:
            req.early = self._server.error(413, body_too_large(self._server.max_body_bytes))
            req.parts = []
            return
        req.parts.append(body)

    def on_message_complete(self) -> None:
        req = self._req
        if req is not None:
            req.complete = True
            req.body_since = -1.0
        self._req = None

    # -- answers ---------------------------------------------------------------------------

    def _closing(self, req: _Request) -> bool:
        """Whether the connection closes after answering `req`."""
        server = self._server
        return (
            req.close
            or not req.keep_alive
            or self._stopped
            or self._served + 1 >= server.max_requests
            or server.stopping
        )

    async def _answer_early(self, req: _Request) -> bool:
        """Write `req.early` before its body is read, then drop the rest of the body as it
        comes (DRAIN_LIMIT bytes within DRAIN_TIME seconds, else the connection closes).
        False: close now."""
        assert req.early is not None
        req.answered = True
        req.parts = []
        if req.expect and not req.continued:
            req.close = True  # the client may send its body or not: close after the answer
        close = req.close = self._closing(req)
        status, headers, body = req.early
        rid = given_or_new(req.given_id)
        extra = self._server.extra_lines(close, rid)
        await self._write_answer(req.method, status, headers, body, extra)
        self._served += 1
        req.drain_until = trio.current_time() + DRAIN_TIME
        access = self._server.access
        if access is not None and req.target:
            self._log(access, req, rid, status, len(body))
        if req.complete:
            return not close
        # The body is still coming: drop it (and close after it when `close`), unless
        # the client was never told to send it.
        return not (req.expect and not req.continued)

    async def _dispatch(self, req: _Request) -> bool:
        """Serve a complete request; whether the connection is kept for the next."""
        self._raw = None
        if req.kind is None:
            keep = await self._run_asgi(req)
        elif req.kind == "stream":
            keep = await self._stream(req)
        else:
            keep = await self._answer(req)
        return self._done(keep)

    def _done(self, keep: bool) -> bool:
        """A request is answered; whether the connection is kept for the next (it is
        then idle)."""
        self._served += 1
        if not keep or self._stopped:
            return False
        server = self._server
        now = server.now()
        self._idle_until = now + server.between  # (`_set_idle`, written out)
        server.connections.idle.add(self)
        if self._req is not None:  # a pipelined head in progress: its time starts now
            self._head_until = now + server.keep_alive
        return True

    # -- appends answered where their answer arrives ----------------------------------------

    def _send_on(self, req: _Request) -> bool:
        """Send a plain append (a POST with its whole body in one piece, nothing queued
        behind it, the connection kept after it, no TLS) to its shard without awaiting
        the answer: `_arrived` writes that where it arrives, and this task goes back to
        reading. False: not sent, `_answer` serves it."""
        parts = req.parts
        if self.tls or self._queue or len(parts) > 1 or self._closing(req):
            return False
        self._raw = None  # (what `_dispatch` does first)
        route = self._server.route
        assert route is not None
        try:
            sent = route.send(
                req.target, req.headers, parts[0] if parts else b"", self._arrived_here
            )
        except Exception:
            return False  # `_answer` meets it again, and answers it as it does
        if sent is None:
            return False
        req.parts = []
        self._fly(req, req.started, req.size, sent, req.given_id)
        return True

    def _fly(
        self, req: _Request, started: float, received: int, sent: Any, given: bytes | None
    ) -> None:
        """Note the append `sent` on as this connection's in flight (`given`: the first
        X-Request-Id of its head, None: it sent none), counted in the metrics."""
        recorder = gateway_metrics.current  # (`_metric` of a POST without TLS)
        if recorder is None:
            series = None
        else:  # (`recorder.begin` of its series, kept)
            series = recorder.appends
            if series is None:
                series = recorder.appends = recorder.series_of("POST", "http", "none")
            series.active += 1
        flight = _new(_InFlight)
        flight.req = req
        flight.started = started
        flight.received = received
        # (`access.new_request_id` written out when the client gave none)
        flight.rid = (
            hexlify(getrandbits(64).to_bytes(8, "big")) if given is None else given_or_new(given)
        )
        flight.sent = sent
        flight.series = series
        flight.state = _SENT
        flight.answer = None  # (`rest`, `size` and `status` are set with _REST)
        self._inflight = flight

    def _learn(self, req: _Request, data: bytes) -> None:
        """`data` was exactly one request, `req`, parsed by llhttp and sent on as a plain
        append (`_send_on`): keep its head (`gateway.plain_heads`) when it is one whose
        repeats `read_here` may serve: HTTP/1.1 kept alive, a Content-Length and no
        Transfer-Encoding, no Expect or Upgrade, no X-Request-Id (a new one per request
        is what clients send), the route's plain append; the whole read its head and
        its body."""
        end = data.find(HEAD_END) + 4
        if (
            end < 4
            or len(data) - end != req.size  # (so the head ends where llhttp found it did)
            or req.version != "1.1"
            or not req.keep_alive
            or req.close
            or req.expect
            or req.upgrade
            or req.given_id is not None
            or req.early is not None
        ):
            return
        has_length = False
        for name, _ in req.headers:
            if name == b"content-length":
                has_length = True
            elif name == b"transfer-encoding" or name == b"x-request-id":
                return
        route = self._server.route
        if not has_length or route is None:
            return
        plain = route.plain_append(req.target, req.headers)
        if plain is not None:
            self._server.plain_heads.keep(data[:end], (req, plain, req.size))
            self._kept_length = req.size

    def _arrived(self, answer: NativeAnswer | None) -> bool:
        """The answer to the append in flight (None: not one to write here), from the
        task that learned it (the shard connection's reader). Written at once when the
        socket takes all of it (True: the request is done). Else what this connection's
        task is to do is noted, `answer` to write (the connection closes after it, the
        socket is gone, the body is large, the budget is over) or the rest to write
        (`_REST`), and the task is woken (`_to_task`)."""
        flight = self._inflight
        if flight is None or flight.state != _SENT:
            return False  # (the task awaits it, or has left it)
        if answer is None:
            return self._to_task(flight)
        try:
            flight.answer = answer
            server = self._server
            # (What else `_closing` looks at is as it was when `_send_on` sent it.)
            if self._stopped or server.stopping:
                return self._to_task(flight)
            status, lines, body = answer
            if status == 204 and type(lines) is bytes:
                # An append's answer (`_whole` written out for it): its headers rendered
                # already (`NativeAnswer`), no body. (The second compared as a float: an
                # `int(time())` cost 400 instructions.)
                now = time()
                if server.second <= now < server.second_end:
                    shared = server.second_lines
                else:
                    shared = server.renew_second_lines(now)
                data = b"".join((_NO_CONTENT, lines, shared, flight.rid, _END))
                size = 0
            else:
                rendered = _whole(flight.req.method, answer, server.extra_lines(False, flight.rid))
                if rendered is None:
                    return self._to_task(flight)
                data, size = rendered
            # Nothing of this connection's is queued (its task writes nothing meanwhile),
            # so its budget admits anything: only what the socket does not take counts.
            written = self._write_some(data)
            if written is None:
                return self._to_task(flight)  # the client is gone: the task's write finds out
            if written < len(data):
                rest = flight.rest = memoryview(data)[written:]
                self.output.admit(len(rest))
                flight.size = size
                flight.status = status
                flight.state = _REST
                return self._to_task(flight)
            self._inflight = None
            access = server.access
            if access is not None:
                self._log_flight(access, flight, status, size)
            series = flight.series
            if series is not None:
                series.finish(status, perf_counter() - flight.started)
            if self._done(True) and self.read_task is not None:
                # This task waits for bytes: for how long now (`_deadline`: between
                # requests, unless a head is in progress).
                until = self._idle_until if self._req is None else self._deadline()
                server.deadlines.wait(self, until)
            return True
        except Exception:
            log.exception("writing an append's answer failed")
            return self._to_task(flight)

    def _to_task(self, flight: _InFlight) -> bool:
        """The append in flight is left to this connection's task (`_settle`): it is
        woken if it waits for bytes. False (not served where it arrived)."""
        if flight.state == _SENT:
            flight.state = _TASK
        task = self.read_task
        if task is not None:  # waiting for bytes: `_receive` returns None
            self.read_task = None
            trio.lowlevel.reschedule(task)
        return False

    async def _settle(self) -> bool:
        """Finish the append in flight from this task: await its answer, or write what
        the task that learned it could not; whether the connection is kept."""
        flight = self._inflight
        assert flight is not None
        route = self._server.route
        assert route is not None
        access = self._server.access
        req, rid = flight.req, flight.rid
        status = 0
        try:
            if flight.state == _REST:
                rest = flight.rest
                status = flight.status
                try:
                    await write_rest(self, self._fd, rest)
                finally:
                    self.output.release(len(rest))
                if access is not None:
                    self._log_flight(access, flight, status, flight.size)
                close = False
            else:
                answer = flight.answer
                if answer is None:
                    flight.state = _AWAITED
                    try:
                        answer = await route.settle(flight.sent)
                    except Exception:
                        self._log_failure(req, rid)
                        answer = route.error(500, "internal error")
                status, headers, out = answer
                close = self._closing(req)
                extra = self._server.extra_lines(close, rid)
                await self._write_answer(req.method, status, headers, out, extra)
                if access is not None:
                    sent = len(out) if framing.has_body(req.method, status) else 0
                    self._log_flight(access, flight, status, sent)
        finally:
            self._inflight = None
            if flight.series is not None:
                flight.series.finish(status, perf_counter() - flight.started)
        return self._done(not close)

    def _abandon(self) -> None:
        """The connection ends with an append in flight: its answer is not written."""
        flight = self._inflight
        assert flight is not None
        self._inflight = None
        flight.state = _AWAITED
        route = self._server.route
        if route is not None:
            route.abandon(flight.sent)
        if flight.series is not None:
            flight.series.finish(0, perf_counter() - flight.started)

    async def _body(self, req: _Request) -> bytes:
        parts, req.parts = req.parts, []
        if not parts:
            return b""
        if len(parts) == 1:
            return parts[0]
        return await bigjoin.join(parts, req.size)  # a large body: off the loop

    async def _answer(self, req: _Request) -> bool:
        server = self._server
        route = server.route
        assert route is not None
        method = req.method
        series = self._metric(req, False)
        started = perf_counter()
        rid = given_or_new(req.given_id)
        body = await self._body(req)
        status = 0
        try:
            if not self.tls:
                self._at_once = (req, rid)
            try:
                answer = await route.answer(
                    method, req.target, req.headers, body, self.until_gone, self._write_at_once
                )
            except Exception:
                self._log_failure(req, rid)
                answer = route.error(500, "internal error")
            finally:
                self._at_once = None
            del body
            access = server.access
            wrote = self._wrote
            if wrote is not None:  # written from the task that learned the answer
                self._wrote = None
                status, size, close, rest = wrote
                if rest is not None:
                    try:
                        await write_rest(self, self._fd, rest)
                    finally:
                        self.output.release(len(rest))
                if access is not None:
                    self._log(access, req, rid, status, size)
                return not close
            if answer is None:  # the client left: nothing to write, the connection ends
                if access is not None:
                    self._log(access, req, rid, CLIENT_GONE, 0)
                return False
            status, headers, out = answer
            close = self._closing(req)
            extra = server.extra_lines(close, rid)
            await self._write_answer(method, status, headers, out, extra)
            if access is not None:
                self._log(
                    access, req, rid, status, len(out) if framing.has_body(method, status) else 0
                )
            return not close
        finally:
            if series is not None:
                series.finish(status, perf_counter() - started)

    async def _write_answer(
        self,
        method: str,
        status: int,
        headers: list[tuple[bytes, bytes]] | bytes,
        body: bytes,
        extra: bytes,
    ) -> None:
        """A whole response: one write (a large body in a second one, uncopied).
        `headers`: a list, or header lines already rendered (`NativeAnswer`); `extra`:
        header lines after them (`Http1Server.extra_lines`)."""
        head, body = _rendered(method, status, headers, body, extra)
        if not body:
            await self._write(head)
        elif len(body) < SEPARATE_BODY_BYTES:
            await self._write(head + body)
        else:
            await self._write_pair(head, body)

    async def _stream(self, req: _Request) -> bool:
        """An SSE read: join the shared upstream, write the head, then the frames."""
        server = self._server
        route = server.route
        assert route is not None
        series = self._metric(req, True)
        started = perf_counter()
        rid = given_or_new(req.given_id)
        body = await self._body(req)
        client = SseClient(self)
        status = 0
        try:
            try:
                result = await route.stream(req.method, req.target, req.headers, body, client)
                del body
            except Exception:
                self._log_failure(req, rid)
                result = route.error(500, "internal error")
            access = server.access
            if not isinstance(result, Streaming):
                status, headers, out = result
                close = self._closing(req)
                extra = server.extra_lines(close, rid)
                await self._write_answer(req.method, status, headers, out, extra)
                if access is not None:
                    self._log(access, req, rid, status, len(out))
                return not close
            # An SSE response may be held for minutes: keep nothing it does not need.
            status = result.status
            leave = result.leave
            req.headers = []
            if self._req is None and not self._queue:
                self._parser = None  # made again for the next request (`_feed`)
            try:
                close = self._closing(req)
                sse_extra = [*server.extra_headers(close), framing.CHUNKED, (REQUEST_ID, rid)]
                await self._write(framing.response_head(status, result.headers, sse_extra))
                client.start(result.prefix)
                del result, sse_extra
                done = await self._pump(client)
                if done:
                    await self._write(framing.LAST_CHUNK)
            finally:
                leave()
                if access is not None:
                    self._log(access, req, rid, status, client.sent)
            return done and not close
        finally:
            if series is not None:
                series.finish(status, perf_counter() - started)

    async def _pump(self, client: SseClient) -> bool:
        """Write what the SSE upstream delivers until it ends (True) or the client is
        gone or dropped (False). Frames usually go to the socket from `deliver`; this
        task writes the rest, and watches for the client leaving meanwhile."""
        watching = True
        while True:
            if client.dropped or self._stopped:
                return False
            if client.queue:
                if not await client.flush():
                    return False
                continue
            if client.ended:
                return True
            with trio.CancelScope() as scope:
                self._wake = scope
                if watching:
                    # Readable while a response is written: the client closed (or
                    # reset), or it pipelined a request (read later; stop watching).
                    try:
                        if self.tls:  # (TLS clients wait for our close_notify)
                            data = bytes(await self.stream.receive_some(MAX_RECV))
                            self._unread += data
                        else:
                            await trio.lowlevel.wait_readable(self._fd)
                            data = await self._peek()
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                        return False
                    if not data:
                        return False
                    watching = False
                else:
                    await trio.sleep_forever()
            self._wake = None

    async def _peek(self) -> bytes:
        """The next byte from the client, left unread (b"": it closed its side)."""
        sock = self.stream.socket
        return bytes(await sock.recv(1, socket.MSG_PEEK))

    async def until_gone(self) -> None:
        """Return once the client has closed its side (or reset the connection), for a
        request answered while nobody reads the socket. Data from the client (a pipelined
        request) is left for later, and ends the watch: it cannot be both."""
        if self.tls:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self._unread += bytes(data)
            await trio.sleep_forever()
        try:
            if not await self._peek():
                return
        except OSError:
            return
        await trio.sleep_forever()

    # -- the ASGI driver -------------------------------------------------------------------

    async def _run_asgi(self, req: _Request) -> bool:
        """Run the ASGI app for one HTTP/1.1 (or 1.0) request whose body is read."""
        server = self._server
        body = await self._body(req)
        exchange = _AsgiExchange(self, req)
        raw_path, _, query = req.target.partition(b"?")
        sock = self.stream.socket if not self.tls else self.stream.transport_stream.socket  # type: ignore[union-attr]
        scope = {
            "type": "http",
            "asgi": {"spec_version": "2.3", "version": "3.0"},
            "http_version": req.version,
            "method": req.method,
            "scheme": "https" if self.tls else "http",
            "path": unquote(raw_path.decode("ascii", "replace")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": server.config.root_path,
            "headers": req.headers,
            "client": _address(sock, peer=True),
            "server": _address(sock, peer=False),
            "state": {**server.state, OUTPUT_STATE: self.output},
            "extensions": {},
        }
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            if not exchange.done:
                await self.until_gone()
            return {"type": "http.disconnect"}

        try:
            await server.app(scope, receive, exchange.send)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        except Exception:
            log.exception("ASGI app failed on %s %r", req.method, req.target)
            if exchange.head_sent:
                return False
            status, headers, out = error_answer(500, "internal error")
            extra = header_lines(server.extra_headers(True))
            await self._write_answer(req.method, status, headers, out, extra)
            return False
        return exchange.done and not exchange.close

    # -- writes ------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        """Write all of `data`: at once when the socket takes it (no yield), else as it
        takes it. Shielded from the caller's cancellation (a half-written response cannot
        be taken back), but not from a socket that takes nothing for WRITE_TIMEOUT
        seconds or the connection being dropped: BrokenResourceError."""
        output = self.output
        if not output.held and not self.tls:
            # Nothing of this connection's is queued, so its budget admits anything:
            # only what the socket does not take at once is counted (most answers, none).
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            if written == len(data):
                return
            rest = memoryview(data)[written:]
            output.admit(len(rest))
            try:
                return await write_rest(self, self._fd, rest)
            finally:
                output.release(len(rest))
        if not output.admit(len(data)):
            log.info("connection over its output budget: dropped")
            self.stop_reading()
            raise trio.BrokenResourceError("over the output budget")
        try:
            if self.tls:
                return await write_tls(self, self.stream, data)
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            if written < len(data):
                await write_rest(self, self._fd, memoryview(data)[written:])
        finally:
            output.release(len(data))

    def _write_at_once(self, answer: Answer) -> None:
        """Write the answer to the request in `_at_once` now, from the task that learned
        it (`NativeRoute.answer`), when the socket takes it without waiting; what it does
        not take this connection's task writes (`_wrote`). A large body, a client over its
        output budget or gone: nothing is written here, the task writes as usual."""
        at_once = self._at_once
        if at_once is None or self._stopped:
            return
        req, rid = at_once
        close = self._closing(req)
        rendered = _whole(req.method, answer, self._server.extra_lines(close, rid))
        if rendered is None:
            return
        data, size = rendered
        output = self.output
        if not output.admit(len(data)):
            return
        written = self._write_some(data)
        if written is None:
            output.release(len(data))
            return  # the client is gone: the task's own write finds out
        self._at_once = None
        output.release(written)
        rest = memoryview(data)[written:] if written < len(data) else None
        self._wrote = (answer[0], size, close, rest)

    def _write_some(self, data: bytes) -> int | None:
        """Write what the socket takes of `data` now, from any task: how much (0 when it
        takes nothing), or None when the client is gone."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            return None

    async def _write_pair(self, head: bytes, body: bytes) -> None:
        """`head` then `body`, the body never copied behind the head."""
        output = self.output
        size = len(head) + len(body)
        if not output.admit(size):
            self.stop_reading()
            raise trio.BrokenResourceError("over the output budget")
        try:
            if self.tls:
                await write_tls(self, self.stream, head)
                return await write_tls(self, self.stream, body)
            try:
                written = os.writev(self._fd, (head, body))
            except BlockingIOError:
                written = 0
            if written < len(head):
                await write_rest(self, self._fd, memoryview(head)[written:])
                written = len(head)
            if written - len(head) < len(body):
                await write_rest(self, self._fd, memoryview(body)[written - len(head) :])
        finally:
            output.release(size)

    # -- bookkeeping -------------------------------------------------------------------------

    def _metric(self, req: _Request, streams: bool) -> gateway_metrics.Series | None:
        """The request's metrics series, counting it in progress (None: metrics off)."""
        recorder = gateway_metrics.current  # None: metrics are off
        if recorder is None:
            return None
        method = req.method
        if streams:
            live = "sse"
        elif method != "GET":
            live = "none"  # (what live_label says of any other method)
        else:
            live = gateway_metrics.live_label(method, req.target.partition(b"?")[2])
        return recorder.begin(method, "https" if self.tls else "http", live)

    def _log(self, access: AccessLog, req: _Request, rid: bytes, status: int, sent: int) -> None:
        path = req.target.partition(b"?")[0].decode("latin-1")
        access.write(rid, req.method, path, status, req.started, req.size, sent, "native")

    @staticmethod
    def _log_flight(access: AccessLog, flight: _InFlight, status: int, sent: int) -> None:
        """`_log` of an append sent on (`_InFlight`: its own arrival and body size)."""
        req = flight.req
        path = req.target.partition(b"?")[0].decode("latin-1")
        started, received = flight.started, flight.received
        access.write(flight.rid, req.method, path, status, started, received, sent, "native")

    @staticmethod
    def _log_failure(req: _Request, rid: bytes) -> None:
        """The route raised: log it with the request's id (the client gets it in the 500)."""
        extra = {"request_id": rid.decode("ascii")}
        log.exception("native route failed on %s %r", req.method, req.target, extra=extra)


class _AsgiExchange:
    """The response side of one ASGI request on an HTTP/1.1 connection."""

    __slots__ = ("chunked", "close", "conn", "done", "head_sent", "headers", "req", "status")

    def __init__(self, conn: Http1Connection, req: _Request) -> None:
        self.conn = conn
        self.req = req
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_sent = False
        self.chunked = False
        self.done = False
        self.close = False

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.status:
                raise RuntimeError("response already started")
            self.status = int(message["status"])
            self.headers = [
                (bytes(name).lower(), bytes(value)) for name, value in message.get("headers", ())
            ]
            if not _has_length(self.headers):  # streamed: the head goes at once
                await self._head(b"", more=True)
            return
        if kind != "http.response.body" or self.done:
            return
        if not self.status:
            raise RuntimeError("response body before its start")
        data = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if not self.head_sent:  # with a Content-Length: head and body in one write
            return await self._head(data, more)
        if data and framing.has_body(self.req.method, self.status):
            await self._data(data)
        if not more:
            await self._end()

    async def _head(self, data: bytes, more: bool) -> None:
        conn = self.conn
        req = self.req
        self.head_sent = True
        bodyful = framing.has_body(req.method, self.status)
        close = conn._closing(req)
        extra = list(conn._server.extra_headers(False))
        if bodyful and not _has_length(self.headers):
            if req.version == "1.1":
                self.chunked = True
                extra.append(framing.CHUNKED)
            else:
                close = True  # an HTTP/1.0 body without a length ends with the connection
        if close:
            extra.append(framing.CLOSE)
        self.close = close
        head = framing.response_head(self.status, self.headers, extra)
        if not bodyful or not data:
            await conn._write(head)
        elif self.chunked:
            await conn._write(head + framing.chunk(data))
        elif len(data) < SEPARATE_BODY_BYTES:
            await conn._write(head + data)
        else:
            await conn._write_pair(head, data)
        if not more:
            await self._end()

    async def _data(self, data: bytes) -> None:
        conn = self.conn
        if not self.chunked:
            await conn._write(data)
        elif len(data) < SEPARATE_BODY_BYTES:
            await conn._write(framing.chunk(data))
        else:  # the body as it is, its chunk framing in writes of their own
            await conn._write_pair(framing.chunk_head(len(data)), data)
            await conn._write(b"\r\n")

    async def _end(self) -> None:
        self.done = True
        if self.chunked:
            await self.conn._write(framing.LAST_CHUNK)


class SseClient:
    """A connection's end of a shared SSE upstream (`gateway.fanout.Subscriber`).

    Frames arrive from the upstream's task and go straight to the socket with a
    non-blocking write; what the socket does not take is queued and written by the
    connection's own task (woken through its wait scope), under TLS every frame. The
    queue counts against the connection's output budget (`gateway.budget`); a client more
    than MAX_BEHIND bytes behind, over budget, or whose socket takes nothing for
    WRITE_TIMEOUT seconds is dropped (its connection closes; SSE clients resume from
    their last offset).
    """

    __slots__ = ("_conn", "dropped", "ended", "live", "queue", "queued", "sent")

    def __init__(self, conn: Http1Connection) -> None:
        self._conn = conn
        self.queue: list[bytes] = []  # not yet written, in order
        self.queued = 0
        self.live = False  # the head is written: frames may go to the socket
        self.ended = False  # the upstream is over
        self.dropped = False  # fell too far behind (or went): no more writes
        self.sent = 0  # bytes written (for the access log)

    def start(self, prefix: bytes) -> None:
        """The head is written: `prefix` goes first, then what was delivered meanwhile."""
        if prefix:
            if not self._conn.output.admit(len(prefix)):
                return self._drop()
            self.queue.insert(0, prefix)
            self.queued += len(prefix)
        self.live = True

    def deliver(self, frame: bytes) -> None:
        if self.ended:
            return
        conn = self._conn
        if self.queued > MAX_BEHIND or not conn.output.admit(len(frame)):
            return self._drop()
        if self.live and not self.queue and not conn.tls:
            try:
                written = os.write(conn._fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:  # the client is gone
                conn.output.release(len(frame))
                return self._drop()
            self.sent += written
            conn.output.release(written)
            if written == len(frame):
                return
            frame = frame[written:]
        self.queue.append(frame)
        self.queued += len(frame)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        wake = self._conn._wake
        if wake is not None:
            wake.cancel()

    async def flush(self) -> bool:
        """Write the queue (frames delivered meanwhile included); False: dropped."""
        conn = self._conn
        queue = self.queue
        output = conn.output
        try:
            while queue and not self.dropped:
                data = queue[0]
                if conn.tls:
                    await write_tls(conn, conn.stream, data)
                    written = len(data)
                else:
                    try:
                        written = os.write(conn._fd, data)
                    except BlockingIOError:
                        written = 0
                self.sent += written
                self.queued -= written
                output.release(written)
                if written < len(data):
                    queue[0] = data[written:]
                    with trio.move_on_after(WRITE_TIMEOUT) as stalled:
                        await trio.lowlevel.wait_writable(conn._fd)
                    if stalled.cancelled_caught:
                        self._drop()
                        return False
                else:
                    del queue[0]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._drop()
            return False
        return not self.dropped

    def _drop(self) -> None:
        if not self.dropped:
            log.info("SSE client dropped: %d bytes behind", self.queued)
        self.dropped = self.ended = True
        self.queue.clear()
        self._conn.output.release(self.queued)
        self.queued = 0
        self._conn.stop_reading()


def _whole(method: str, answer: NativeAnswer, extra: bytes) -> tuple[bytes, int] | None:
    """`answer` rendered as one write's bytes, with its body's size; None when its body
    is large enough to be written apart (the connection's task does that, uncopied)."""
    status, headers, body = answer
    head, body = _rendered(method, status, headers, body, extra)
    if len(body) >= SEPARATE_BODY_BYTES:
        return None
    return (head + body if body else head), len(body)


def _rendered(
    method: str,
    status: int,
    headers: list[tuple[bytes, bytes]] | bytes,
    body: bytes,
    extra: bytes,
) -> tuple[bytes, bytes]:
    """A whole response's head, and its body (empty when the response has none).
    `headers`: a list, or header lines already rendered (`NativeAnswer`, Content-Length
    included); `extra`: header lines after them (`Http1Server.extra_lines`)."""
    with_body = framing.has_body(method, status)
    if isinstance(headers, bytes):
        lines = headers  # its Content-Length included
    else:
        lines = header_lines(headers)
        if with_body and not _has_length(headers):
            extra += b"content-length: %d\r\n" % len(body)
    head = b"%b%b%b\r\n" % (framing.status_line(status), lines, extra)
    return head, body if with_body else b""


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-length" for name, _ in headers)


def _address(sock: Any, *, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
