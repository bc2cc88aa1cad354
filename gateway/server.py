"""The gateway's server: listeners, shutdown, and hypercorn for HTTP/2.

`serve` accepts connections and gives each to `gateway.http1`, which serves plain
HTTP/1.1 itself (llhttp, our own socket loop and framing; see its docstring for the
deadlines, limits and keep-alive rules). What is HTTP/2 (prior knowledge, an h2c upgrade,
ALPN "h2" under TLS) it hands to hypercorn's protocol classes, driven here by a leaner
per-connection loop than `hypercorn.trio.serve`'s:

- the idle timeouts are the deadline of the read waiting for the next request, not a
  task restarted per request; shutdown closes idle connections through `Connections`;
- writes are lock-free when nobody else is writing, and empty writes are skipped;
- the response bytes a connection has queued (HTTP/2 stream buffers included) count
  against its `gateway.budget`: one that asks for more while over budget is dropped;
- a request body must keep arriving as on HTTP/1.1 (else 408 and a reset stream), a
  header block must be complete within the keep-alive timeout, and a socket that takes
  no bytes for `WRITE_TIMEOUT` seconds is closed.

The listening loop, graceful shutdown and lifespan handling follow hypercorn's
`worker_serve`. Plain TCP, or TLS on listeners from `gateway.tls`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from math import inf
from time import time
from typing import Any
from wsgiref.handlers import format_date_time

import h2.errors
import h2.events
import h2.exceptions
import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, Data, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol, StreamBuffer
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
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
    wrap_app,
)

from ds_cluster.gateway.access import AccessLog
from ds_cluster.gateway.answers import error_answer
from ds_cluster.gateway.budget import (
    OUTPUT_STATE,
    UNLIMITED,
    ConnectionOutput,
    OutputBudget,
)
from ds_cluster.gateway.http1 import (
    DEFAULT_MAX_BODY,
    Http1Connection,
    Http1Server,
    NativeRoute,
    body_deadline,
)
from ds_cluster.gateway.socket_writes import write_rest, write_tls
from ds_cluster.gateway.tls import TLSListener

log = logging.getLogger(__name__)
TLS_CLOSE_TIMEOUT = 1.0  # seconds to send TLS close_notify before the socket just closes
CONNECTION_CLOSE = (b"connection", b"close")
_TIMEOUT = "request body too slow"
_TIMEOUT_BODY = _TIMEOUT.encode() + b"\n"  # for HTTP/2 streams, written by hand


class LeanConfig(Config):
    """Hypercorn's Config with the Date header formatted once per second, not per response,
    and the wait between a connection's requests (`idle_timeout`, seconds)."""

    idle_timeout = 65.0
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
        return headers  # callers copy it before adding their own


class LeanH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1, for the connections handed over to hypercorn (`gateway.http1`
    serves plain HTTP/1.1 itself): the first request of an h2c upgrade, and what follows
    when the upgrade is not taken. Request bodies get the same deadlines as on
    `gateway.http1`, and Content-Length with Transfer-Encoding is refused."""

    _body_since = -1.0  # when the request body in progress began (-1: none)
    _body_bytes = 0

    async def _create_stream(self, request: h11.Request) -> None:
        names = {name for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # Either framing may be what an intermediary used: answer, then close, so no
            # byte after this head is read as a request (RFC 9112 6.3).
            return await self._refuse(400, "both Content-Length and Transfer-Encoding")
        return await super()._create_stream(request)

    async def _refuse(self, status: int, message: str) -> None:
        """Answer `status` before reading the body, and close the connection."""
        _, headers, body = error_answer(status, message, (CONNECTION_CLOSE,))
        headers = [*headers, *self.config.response_headers("h11")]
        for event in (
            h11.Response(headers=headers, status_code=status),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            with contextlib.suppress(h11.LocalProtocolError):
                data = self.connection.send(event)
                if data:
                    await self.send(RawData(data=data))
        await self.send(Closed())

    def body_deadline(self, received: int) -> float:
        """When more of the request body must have arrived (inf: none is in progress).
        Called with the size of each read; O(1)."""
        if self.connection.their_state is not h11.SEND_BODY:
            self._body_since = -1.0
            return inf
        now = trio.current_time()
        if self._body_since < 0:
            self._body_since = now
            self._body_bytes = 0
        else:
            self._body_bytes += received
        return body_deadline(self._body_since, self._body_bytes, now)

    async def body_expired(self) -> None:
        """The request body stopped arriving: 408 if nothing was answered yet; close."""
        self._body_since = -1.0
        if self.connection.our_state is h11.SEND_RESPONSE:
            await self._refuse(408, _TIMEOUT)
        else:
            await self.send(Closed())


class _CountedStreamBuffer(StreamBuffer):
    """hypercorn's per-stream HTTP/2 send buffer, counted in the connection's budget
    (pushes are counted by `LeanH2Protocol.stream_send`, which may refuse them)."""

    output: ConnectionOutput
    counted = 0

    async def pop(self, max_length: int) -> bytes:
        data = await super().pop(max_length)
        self._uncount(len(data))
        return data

    async def close(self) -> None:
        self._uncount(self.counted)
        await super().close()

    def _uncount(self, size: int) -> None:
        size = min(size, self.counted)
        self.counted -= size
        self.output.release(size)


class LeanH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 with bounded output and request-body deadlines per stream.

    - Response bytes in stream buffers count against the connection's budget; a push
      while over budget closes the connection.
    - A stream whose application ends without ending the response (an SSE reader
      dropped for falling behind) is reset, and its buffer released.
    - When the connection closes, every stream buffer is closed, so no task stays
      parked on flow control that will never come.
    - A request body must keep arriving as on HTTP/1.1; a stream whose body does not is
      answered 408 (if it was not answered yet) and reset, the connection lives on.
    - A header block must be complete within the keep-alive timeout, even while other
      streams keep the connection busy (h2 holds at most 64 CONTINUATION frames of it
      meanwhile); otherwise the connection is closed.
    """

    _head_since = -1.0  # when the incomplete header block in progress began (-1: none)

    def __init__(self, *args: Any, output: ConnectionOutput, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output = output
        self._bodies: dict[int, list[float]] = {}  # stream id -> [since, received, last]

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        await super()._create_stream(request)
        buffer = self.stream_buffers.get(request.stream_id)
        if type(buffer) is StreamBuffer:
            buffer.__class__ = _CountedStreamBuffer
            buffer.output = self.output  # type: ignore[attr-defined]

    async def handle(self, event: Event) -> None:
        await super().handle(event)
        if isinstance(event, Closed):
            self._bodies.clear()
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Body | Data):
            buffer = self.stream_buffers.get(event.stream_id)
            if buffer is None or buffer.complete:
                return
            if not self.output.admit(len(event.data)):
                log.info("HTTP/2 connection over its output budget: dropped")
                await self.send(Closed())
                return
            if isinstance(buffer, _CountedStreamBuffer):
                buffer.counted += len(event.data)
            else:
                self.output.release(len(event.data))
        elif isinstance(event, StreamClosed):
            buffer = self.stream_buffers.get(event.stream_id)
            if buffer is not None and not buffer._complete:
                await self._reset(event.stream_id, h2.errors.ErrorCodes.CANCEL)
        await super().stream_send(event)

    async def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        """Reset one stream and release its buffer; the send task forgets it."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, code)
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:
            await buffer.close()
            with contextlib.suppress(Exception):
                self.priority.unblock(stream_id)
        await self.has_data.set()
        await self._flush()

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        bodies = self._bodies
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                body = bodies.get(event.stream_id)  # type: ignore[attr-defined]
                if body is not None:
                    body[1] += event.flow_controlled_length  # type: ignore[attr-defined]
                    body[2] = trio.current_time()
            elif kind is h2.events.RequestReceived:
                if event.stream_ended is None:  # type: ignore[attr-defined]
                    now = trio.current_time()
                    bodies[event.stream_id] = [now, 0, now]  # type: ignore[attr-defined]
            elif kind is h2.events.StreamEnded or kind is h2.events.StreamReset:
                bodies.pop(event.stream_id, None)  # type: ignore[attr-defined]
        # hypercorn hands a DataReceived to its stream without checking the stream is still
        # there: the body of a request answered early (a 401 or 400 sent before its
        # END_STREAM) raised KeyError and dropped the connection. Each DataReceived is
        # checked just before hypercorn sees it; one for a stream already answered only
        # gives its flow-control window back.
        segment: list[h2.events.Event] = []
        for event in events:
            if type(event) is h2.events.DataReceived:
                if segment:
                    await super()._handle_events(segment)
                    segment = []
                if event.stream_id not in self.streams:
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        self.connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    continue
            segment.append(event)
        await super()._handle_events(segment)

    def _head_deadline(self) -> float:
        # h2 keeps an incomplete header block (HEADERS awaiting CONTINUATION) here.
        if not getattr(self.connection.incoming_buffer, "_headers_buffer", None):
            self._head_since = -1.0
            return inf
        if self._head_since < 0:
            self._head_since = trio.current_time()
        return self._head_since + float(self.config.keep_alive_timeout)

    def body_deadline(self, received: int) -> float:
        """The earliest time a request body in progress must have sent more, or an
        incomplete header block must be complete (inf: none)."""
        deadline = self._head_deadline()
        if not self._bodies:
            return deadline
        bodies = (body_deadline(s, int(r), last) for s, r, last in self._bodies.values())
        return min(deadline, *bodies)

    async def body_expired(self) -> None:
        """Answer 408 and reset the streams whose bodies stopped arriving; close the
        connection on a header block that did not complete in time."""
        now = trio.current_time()
        if self._head_deadline() <= now:
            log.info("HTTP/2 header block incomplete for too long: connection closed")
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.connection.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                await self._flush()
            await self.send(Closed())
            return
        for stream_id, (since, received, last) in list(self._bodies.items()):
            if body_deadline(since, int(received), last) > now:
                continue
            del self._bodies[stream_id]
            stream = self.streams.get(stream_id)
            if isinstance(stream, HTTPStream) and stream.state is ASGIHTTPState.REQUEST:
                stream.state = ASGIHTTPState.CLOSED  # the application must not answer now
                headers = [(b":status", b"408"), (b"content-length", b"%d" % len(_TIMEOUT_BODY))]
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.connection.send_headers(stream_id, headers)
                    self.connection.send_data(stream_id, _TIMEOUT_BODY, end_stream=True)
            await self._reset(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            await self._close_stream(stream_id)


class _Protocols(ProtocolWrapper):
    """hypercorn's protocol selection, with the lean HTTP/1.1 and HTTP/2 classes in place
    of its own."""

    def __init__(self, *args: Any, output: ConnectionOutput | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output = output if output is not None else UNLIMITED.connection()
        if type(self.protocol) is H11Protocol:
            self.protocol = LeanH11Protocol(*self._protocol_args())
        elif type(self.protocol) is H2Protocol:  # chosen by ALPN under TLS
            self.protocol = self._h2()

    def _protocol_args(self) -> tuple[Any, ...]:
        """What hypercorn hands each protocol class, in its order."""
        return (
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

    def _h2(self) -> LeanH2Protocol:
        return LeanH2Protocol(*self._protocol_args(), output=self.output)

    async def handle(self, event: Event) -> None:
        try:
            return await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:
            self.protocol = self._h2()
            await self.protocol.initiate()
            if error.data != b"":
                return await self.protocol.handle(RawData(data=error.data))
        except H2CProtocolRequiredError as error:
            self.protocol = self._h2()
            await self.protocol.initiate(error.headers, error.settings)
            if error.data != b"":
                return await self.protocol.handle(RawData(data=error.data))


class Connections:
    """A server's idle keep-alive connections (`gateway.http1` ones and hypercorn's):
    closed at once when it starts shutting down (a busy one is closed after its
    response)."""

    def __init__(self) -> None:
        self.idle: set[LeanTCPServer | Http1Connection] = set()

    def close_idle(self) -> None:
        for connection in list(self.idle):
            connection.stop_reading()


class LeanTCPServer(TCPServer):
    """One HTTP/2 client connection that `gateway.http1` handed over (TLS already
    negotiated, `initial`: the bytes it read): hypercorn's `TCPServer`, with the
    keep-alive timeout as the deadline of the read that waits for the next request (no
    task of its own), and lock-free writes when nobody else is writing."""

    def __init__(
        self,
        *args: Any,
        connections: Connections | None = None,
        output: OutputBudget = UNLIMITED,
        initial: bytes = b"",
    ) -> None:
        super().__init__(*args)
        self._initial = initial
        self.tls = isinstance(self.stream, trio.SSLStream)
        self._connections = connections if connections is not None else Connections()
        self._keep_alive = float(self.config.keep_alive_timeout)  # a request head's limit
        self._between = float(getattr(self.config, "idle_timeout", self._keep_alive))
        self._idle_until = inf  # while idle: when the connection times out
        self._answered = False  # idle after a response (not a fresh connection)
        self._read_scope: trio.CancelScope | None = None
        self.write_scope: trio.CancelScope | None = None  # the write in progress
        self.dropped = False  # stop_reading was called: a write in progress gives up
        self.output = output.connection()  # response bytes queued for this client

    async def run(self) -> None:
        try:
            if self.tls:  # (the handshake is done)
                alpn = self.stream.selected_alpn_protocol() or "http/1.1"
                sock = self.stream.transport_stream.socket
            else:
                alpn = "http/1.1"
                sock = self.stream.socket
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            # Per connection, so the ASGI app finds this connection's output budget.
            state = ConnectionState({**self.state, OUTPUT_STATE: self.output})
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = _Protocols(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    state,
                    self.tls,
                    client,
                    server,
                    self.protocol_send,
                    alpn,
                    output=self.output,
                )
                await self.protocol.initiate()
                self._set_idle(True, answered=False)
                try:
                    await self._read_data()
                finally:
                    self._connections.idle.discard(self)
        except OSError:
            pass
        except Exception:  # one connection's failure must never stop the server
            log.exception("connection handler failed")
        finally:
            self.output.close()
            await self._close()

    def stop_reading(self) -> None:
        """Shutdown: end this idle connection now rather than at its keep-alive deadline.
        Also how a connection is dropped: a write in progress is abandoned too."""
        self.dropped = True
        if self._read_scope is not None:
            self._read_scope.cancel()
        if self.write_scope is not None:
            self.write_scope.cancel()

    async def _read_data(self) -> None:
        """Feed the protocol until the client closes. The whole loop runs in one cancel
        scope whose deadline is the keep-alive deadline while the connection is idle
        (which is also the deadline of a request head) and infinite while a request is in
        progress (hypercorn's read_timeout is not used). While a request body is arriving,
        each read also has the body's deadline (`body_deadline`)."""
        # The trio socket: no per-call error mapping.
        receive = self._receive_tls if self.tls else self.stream.socket.recv
        protocols = self.protocol
        deadline = inf  # of the request body in progress
        with trio.CancelScope(deadline=self._idle_until) as scope:
            self._read_scope = scope
            # Reset by the peer (OSError), or closed by the protocol after a response.
            with contextlib.suppress(OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                if self._initial:  # what gateway.http1 read: it may end in a partial head
                    initial, self._initial = self._initial, b""
                    await protocols.handle(RawData(initial))
                    deadline = protocols.protocol.body_deadline(len(initial))  # type: ignore[union-attr]
                while True:
                    if deadline == inf:
                        data = await receive(MAX_RECV)
                    else:
                        with trio.move_on_at(deadline) as slow:
                            data = await receive(MAX_RECV)
                        if slow.cancelled_caught:
                            await protocols.protocol.body_expired()  # type: ignore[union-attr]
                            deadline = protocols.protocol.body_deadline(0)  # type: ignore[union-attr]
                            continue
                    if self._idle_until != inf and self._answered and data:
                        self._head_started()  # a new request's first bytes
                    await protocols.handle(RawData(data))
                    if not data:
                        break
                    deadline = protocols.protocol.body_deadline(len(data))  # type: ignore[union-attr]
        self._read_scope = None
        if scope.cancelled_caught:
            # Idle past keep_alive_timeout, or the server is shutting down.
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()
            return
        await self.protocol.handle(Closed())

    async def _receive_tls(self, max_bytes: int) -> bytes:
        return bytes(await self.stream.receive_some(max_bytes))

    async def _close(self) -> None:
        """Close the connection; under TLS, the close_notify gets TLS_CLOSE_TIMEOUT
        seconds (the socket itself closes in any case)."""
        if not self.tls:
            return await super()._close()
        with trio.move_on_after(TLS_CLOSE_TIMEOUT):
            await self.stream.aclose()

    async def _initiate_server_close(self) -> None:
        if not self.tls:
            return await super()._initiate_server_close()
        await self.protocol.handle(Closed())
        await self._close()

    def _head_started(self) -> None:
        """Bytes of the next request arrived: its head gets the keep-alive timeout from
        here, not the rest of the long wait between requests."""
        self._answered = False
        self._idle_until = min(self._idle_until, trio.current_time() + self._keep_alive)
        if self._read_scope is not None:
            self._read_scope.deadline = self._idle_until

    def _set_idle(self, idle: bool, *, answered: bool = True) -> None:
        if idle:
            self._answered = answered
            wait = self._between if answered else self._keep_alive
            self._idle_until = trio.current_time() + wait
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
            data = event.data
            if not data:
                return
            if not self.output.admit(len(data)):
                log.info("connection over its output budget: dropped")
                return await self.drop()
            try:
                self.send_lock.acquire_nowait()
            except trio.WouldBlock:
                try:
                    await self.send_lock.acquire()
                except BaseException:  # cancelled while waiting: nothing was queued
                    self.output.release(len(data))
                    raise
            try:
                await self._write(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.drop()
            finally:
                self.output.release(len(data))
                self.send_lock.release()
        elif isinstance(event, Updated):
            self._set_idle(event.idle)
        else:
            await super().protocol_send(event)

    async def drop(self) -> None:
        """End this connection now (its client is gone, stalled or over budget): close
        the socket, and tell the protocol, whose streams then end."""
        self.stop_reading()
        with trio.CancelScope(shield=True):
            await super().protocol_send(Closed())

    async def _write(self, data: bytes) -> None:
        """Write all of `data`: at once when the socket takes it (no yield), else as the
        socket takes it (`gateway.socket_writes`: shielded, but not from a stalled socket
        or a dropped connection: BrokenResourceError)."""
        if self.tls:
            return await write_tls(self, self.stream, data)
        fd = self.stream.socket.fileno()
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            await write_rest(self, fd, memoryview(data)[written:])


async def serve(
    app: Callable[..., Awaitable[None]],
    config: Config,
    listeners: Sequence[trio.SocketListener | TLSListener],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    native: NativeRoute | None = None,
    output: OutputBudget | None = None,
    access: AccessLog | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI `app` on `listeners` (plain TCP or `gateway.tls`) until
    `shutdown_trigger` returns, then give connections `config.graceful_timeout` seconds to
    finish (as hypercorn's `worker_serve`, which this follows). HTTP/1.1 connections are
    `gateway.http1`'s: requests `native` takes skip ASGI, and `access` logs them (the
    ASGI app logs its own, see `gateway.access`); HTTP/2 ones are hypercorn's.
    `output`: the budget for response bytes queued for clients (default: unbounded)."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    budget = output if output is not None else UNLIMITED
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            binds = [
                f"{'https' if isinstance(lst, TLSListener) else 'http'}://"
                f"{repr_socket_addr(lst.socket.family, lst.socket.getsockname())}"
                for lst in listeners
            ]
            for bind in binds:
                await config.log.info(f"Running on {bind} (CTRL + C to quit)")
            task_status.started(binds)
            connections = Connections()

            async def hand_over(stream: Any, data: bytes) -> None:
                """HTTP/2: hypercorn serves the connection, `data` (already read) first."""
                state = ConnectionState(lifespan_state.copy())
                args = (wrapped, config, context, state, stream)
                tcp = LeanTCPServer(*args, connections=connections, output=budget, initial=data)
                await tcp.run()

            http1 = Http1Server(
                app=app,
                config=config,
                context=context,
                state=lifespan_state,
                route=native,
                access=access,
                connections=connections,
                output=budget,
                hand_over=hand_over,
                tls_close_timeout=TLS_CLOSE_TIMEOUT,
                max_body_bytes=DEFAULT_MAX_BODY,
            )
            # Read deadlines and readiness are kept until the last connection ends (the
            # lifespan's nursery outlives the connections'; it is cancelled after them).
            lifespan_nursery.start_soon(http1.deadlines.run)
            lifespan_nursery.start_soon(http1.readiness.run)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            http1.serve,
                            list[trio.abc.Listener[Any]](listeners),
                            handler_nursery=server_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others from None
            finally:
                http1.stopping = True  # (what `context.terminated` says, read per request)
                await context.terminated.set()
                connections.close_idle()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
