"""Hypercorn's HTTP protocol classes behind a leaner per-connection loop.

`hypercorn.trio.serve` spends most of a small request's CPU outside the application: per
request it restarts an idle-timeout task (a lock, a cancelled task and a new one), takes
a lock around every socket write, writes the response head and body with separate
`send` calls and yields once more for the empty end-of-message write. On a gateway whose
whole job is small requests that is most of the budget. `serve` here keeps hypercorn's
parsing, ASGI adaptation, HTTP/2 handling and configuration, and changes only how a
connection is driven:

- stream requests on HTTP/1.1 go to the native route (`gateway.native`) instead of
  hypercorn's HTTPStream and the ASGI app; HTTP/2, the control routes and requests the
  route does not take (percent-encoded live queries, HTTP/1.0 SSE) use ASGI as before;
- the keep-alive timeout is the deadline of the read waiting for the next request, not a
  task restarted per request; shutdown closes idle connections through `Connections`;
- a complete response (one with a Content-Length) goes out in one write, head and body
  together (a large body in a second write, uncopied); streamed responses send their
  head at once;
- empty writes are skipped, and the send lock is taken without yielding when it is free.

The listening loop, graceful shutdown and lifespan handling follow hypercorn's
`worker_serve`. Plain TCP only (the gateway terminates no TLS; HTTP/2 still works with
prior knowledge or an h2c upgrade, through hypercorn's own classes).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from itertools import chain
from math import inf
from time import time
from typing import Any
from wsgiref.handlers import format_date_time

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import (
    ShutdownError,
    parse_socket_addr,
    raise_shutdown,
    repr_socket_addr,
    suppress_body,
    wrap_app,
)

from gateway.native import NativeExchange, NativeRoute

log = logging.getLogger(__name__)
SEPARATE_BODY_BYTES = 64 * 1024  # a body this large is written apart from its head


class LeanConfig(Config):
    """Hypercorn's Config with the Date header formatted once per second, not per response."""

    _headers_at = -1
    _headers: dict[str, list[tuple[bytes, bytes]]]

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        now = int(time())
        if now != self._headers_at:
            self._headers_at = now
            self._headers = {}
        headers = self._headers.get(protocol)
        if headers is None:
            headers = []
            if self.include_date_header:
                headers.append((b"date", format_date_time(now).encode("ascii")))
            if self.include_server_header:
                headers.append((b"server", f"hypercorn-{protocol}".encode("ascii")))
            headers.extend((b"alt-svc", value.encode()) for value in self.alt_svc_headers)
            self._headers[protocol] = headers
        return headers  # callers copy it (chain/+) before adding their own


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-length" for name, _ in headers)


class LeanH11Protocol(H11Protocol):
    """HTTP/1.1 that writes a complete response's head and body with one socket write,
    and hands requests its `native` route accepts to it directly (no ASGI)."""

    _held = b""  # an encoded response head waiting for its body
    native: NativeRoute | None = None
    tcp: LeanTCPServer  # the connection (set by LeanTCPServer)

    async def _create_stream(self, request: h11.Request) -> None:
        route = self.native
        method = request.method.decode("ascii").upper()
        kind = route.takes(method, request.target) if route is not None else None
        # Shared SSE frames are written as HTTP/1.1 chunks: other versions go through ASGI.
        if kind is None or (kind == "stream" and request.http_version != b"1.1"):
            return await super()._create_stream(request)
        assert route is not None
        exchange = NativeExchange(
            self, route, method, request.target, list(request.headers), kind == "stream"
        )
        self.stream = exchange  # type: ignore[assignment]
        self.keep_alive_requests += 1
        for name, value in request.headers:
            if name == b"content-length" and int(value) > route.max_body_bytes:
                await exchange.refuse_too_large(int(value))
                break

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200 and _has_length(event.headers):
            headers = list(chain(event.headers, self.config.response_headers("h11")))
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            self._held = self._encode(h11.Response(headers=headers, status_code=event.status_code))
            return
        if isinstance(event, Body):
            data = self._encode(h11.Data(data=event.data))
        elif isinstance(event, EndBody):
            data = self._encode(h11.EndOfMessage())
        else:
            await self._flush_held()
            return await super().stream_send(event)
        if self._held:
            if len(data) < SEPARATE_BODY_BYTES:
                data = self._held + data
            else:  # two writes cost less than copying a large body behind the head
                await self._flush_held()
            self._held = b""
        if data:
            await self.send(RawData(data=data))

    async def send_answer(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, method: str
    ) -> None:
        """A whole response without stream events: head, body and end in one write (a
        large body in its own). What the native route answers with."""
        headers = [*headers, *self.config.response_headers("h11")]
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            headers.append((b"connection", b"close"))
        head = self._encode(h11.Response(headers=headers, status_code=status))
        if body and not suppress_body(method, status):
            data = self._encode(h11.Data(data=body))
        else:
            data = b""
        end = self._encode(h11.EndOfMessage())
        if len(data) < SEPARATE_BODY_BYTES:
            await self.send(RawData(data=head + data + end if data or end else head))
            return
        await self.send(RawData(data=head))
        await self.send(RawData(data=data))
        if end:
            await self.send(RawData(data=end))

    async def until_gone(self) -> None:
        """Return once the client has closed its side (or reset the connection), for a
        request answered inline while nobody reads the socket. Data from the client
        (a pipelined request) is left unread, and ends the watch: it cannot be both."""
        sock = self.tcp.stream.socket
        try:
            await trio.lowlevel.wait_readable(sock)
            if await sock.recv(1, socket.MSG_PEEK):
                await trio.sleep_forever()
        except OSError:
            pass

    async def _flush_held(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            await self.send(RawData(data=data))

    def _encode(self, event: Any) -> bytes:
        """h11's bytes for `event`; b"" when the peer already broke the protocol (as
        hypercorn's own `_send_h11_event`)."""
        try:
            # passthrough: h11 hands the body back as it is instead of joining a copy
            pieces = self.connection.send_with_data_passthrough(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return b""
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class _Protocols(ProtocolWrapper):
    """hypercorn's protocol selection, with the lean HTTP/1.1 class in place of its own."""

    def __init__(
        self, *args: Any, native: NativeRoute | None = None, tcp: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if type(self.protocol) is H11Protocol:
            self.protocol = LeanH11Protocol(
                self.app,
                self.config,
                self.context,
                self.task_group,
                self.state,
                self.ssl,
                self.client,
                self.server,
                self.send,
            )
            self.protocol.native = native
            self.protocol.tcp = tcp


class Connections:
    """A server's idle keep-alive connections: closed at once when it starts shutting down
    (a busy one is closed by the protocol after its response, as hypercorn does)."""

    def __init__(self) -> None:
        self.idle: set[LeanTCPServer] = set()

    def close_idle(self) -> None:
        for connection in list(self.idle):
            connection.stop_reading()


class LeanTCPServer(TCPServer):
    """One client connection: hypercorn's `TCPServer`, with the keep-alive timeout as the
    deadline of the read that waits for the next request (no task of its own), and
    lock-free writes when nobody else is writing."""

    def __init__(
        self,
        *args: Any,
        native: NativeRoute | None = None,
        connections: Connections | None = None,
    ) -> None:
        super().__init__(*args)
        self._native = native
        self._connections = connections if connections is not None else Connections()
        self._keep_alive = float(self.config.keep_alive_timeout)
        self._idle_until = inf  # while idle: when the connection times out
        self._read_scope: trio.CancelScope | None = None

    async def run(self) -> None:
        sock = self.stream.socket
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = _Protocols(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    False,
                    client,
                    server,
                    self.protocol_send,
                    "http/1.1",
                    native=self._native,
                    tcp=self,
                )
                await self.protocol.initiate()
                self._set_idle(True)
                try:
                    await self._read_data()
                finally:
                    self._connections.idle.discard(self)
        except OSError:
            pass
        except Exception:  # one connection's failure must never stop the server
            log.exception("connection handler failed")
        finally:
            await self._close()

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` in this connection's task group (ends with the connection); nothing
        when the connection is already closing (then there is nothing left to do)."""
        with contextlib.suppress(RuntimeError, AttributeError):  # closed / gone nursery
            self._task_group.spawn(fn)

    def stop_reading(self) -> None:
        """Shutdown: end this idle connection now rather than at its keep-alive deadline."""
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def _read_data(self) -> None:
        """Feed the protocol until the client closes. The whole loop runs in one cancel
        scope whose deadline is the keep-alive deadline while the connection is idle and
        infinite while a request is in progress (hypercorn's read_timeout is not used)."""
        receive = self.stream.socket.recv  # the trio socket: no per-call error mapping
        with trio.CancelScope(deadline=self._idle_until) as scope:
            self._read_scope = scope
            # Reset by the peer (OSError), or closed by the protocol after a response.
            with contextlib.suppress(OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                while True:
                    data = await receive(MAX_RECV)
                    await self.protocol.handle(RawData(data))
                    if not data:
                        break
        self._read_scope = None
        if scope.cancelled_caught:
            # Idle past keep_alive_timeout, or the server is shutting down.
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()
            return
        await self.protocol.handle(Closed())

    def _set_idle(self, idle: bool) -> None:
        if idle:
            self._idle_until = trio.current_time() + self._keep_alive
            self._connections.idle.add(self)
            if self.context.terminated.is_set():  # HTTP/2 done at shutdown (h11 closes itself)
                self.stop_reading()
        else:
            self._idle_until = inf
            self._connections.idle.discard(self)
        if self._read_scope is not None:
            self._read_scope.deadline = self._idle_until

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if not event.data:
                return
            try:
                self.send_lock.acquire_nowait()
            except trio.WouldBlock:
                await self.send_lock.acquire()
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
            finally:
                self.send_lock.release()
        elif isinstance(event, Updated):
            self._set_idle(event.idle)
        else:
            await super().protocol_send(event)


async def serve(
    app: Callable[..., Awaitable[None]],
    config: Config,
    listeners: list[trio.SocketListener],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    native: NativeRoute | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI `app` on plain-TCP `listeners` until `shutdown_trigger` returns, then
    give connections `config.graceful_timeout` seconds to finish (as hypercorn's
    `worker_serve`, which this follows). HTTP/1.1 requests `native` accepts skip ASGI;
    with an access log configured, every request goes through ASGI (where it is logged)."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            binds = [
                f"http://{repr_socket_addr(lst.socket.family, lst.socket.getsockname())}"
                for lst in listeners
            ]
            for bind in binds:
                await config.log.info(f"Running on {bind} (CTRL + C to quit)")
            task_status.started(binds)
            connections = Connections()
            handler = partial(
                LeanTCPServer,
                wrapped,
                config,
                context,
                ConnectionState(lifespan_state.copy()),
                native=None if config.accesslog else native,
                connections=connections,
            )
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            handler,
                            listeners,
                            handler_nursery=server_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                connections.close_idle()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
