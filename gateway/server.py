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
- the idle timeouts are the deadline of the read waiting for the next request, not a
  task restarted per request; shutdown closes idle connections through `Connections`;
- a complete response (one with a Content-Length) goes out in one write, head and body
  together (a large body in a second write, uncopied); streamed responses send their
  head at once;
- empty writes are skipped, and the send lock is taken without yielding when it is free.

Two idle timeouts: a new connection must send its first request head within the
keep-alive timeout (5 s by default), and any later head must be complete within it from its
first byte; between requests, a connection that has been answered waits `idle_timeout`
(65 s by default, the gateway's `--idle-timeout`). The long wait is for clients: one whose
event loop is busy for longer than the server's idle timeout reuses a connection the server
has just closed, and loses that request to a reset (Node's undici does, under load). It
stays above the idle timeouts of clients (4-5 s) and of load balancers (60 s), so the
client side closes first.

It also closes the doors a client could hold open: a request head must arrive within the
keep-alive timeout, a request body must keep arriving (BODY_GRACE seconds, then at least
BODY_MIN_RATE bytes/s on average, and never BODY_STALL seconds without a byte; else 408),
a socket that takes no bytes for `WRITE_TIMEOUT` seconds is closed, and the response bytes a
connection has queued count against its `gateway.budget` (HTTP/2 stream buffers included):
one that asks for more while over budget is dropped. A request with both Content-Length and
Transfer-Encoding is answered 400 and the connection closed (RFC 9112 6.3).

The listening loop, graceful shutdown and lifespan handling follow hypercorn's
`worker_serve`. Plain TCP, or TLS on listeners from `gateway.tls` (ALPN picks HTTP/2 or
HTTP/1.1; without TLS HTTP/2 works with prior knowledge or an h2c upgrade). Under TLS the
native route serves the same requests; reads and writes go through the connection's
`trio.SSLStream` instead of the raw socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from itertools import chain
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
from hypercorn.protocol.events import Body, Data, EndBody, Response, StreamClosed
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
    suppress_body,
    wrap_app,
)

from ds_cluster.gateway.access import AccessLog
from ds_cluster.gateway.answers import error_answer
from ds_cluster.gateway.budget import (
    OUTPUT_STATE,
    UNLIMITED,
    WRITE_TIMEOUT,
    ConnectionOutput,
    OutputBudget,
)
from ds_cluster.gateway.native import NativeExchange, NativeRoute
from ds_cluster.gateway.tls import TLSListener

log = logging.getLogger(__name__)
SEPARATE_BODY_BYTES = 64 * 1024  # a body this large is written apart from its head
EARLY_CHECK_BYTES = 64 * 1024  # a request body larger is checked (`route.refuse`) at its head
TLS_WRITE_PIECE = 256 * 1024  # under TLS, WRITE_TIMEOUT applies to each piece this large
TLS_CLOSE_TIMEOUT = 1.0  # seconds to send TLS close_notify before the socket just closes
BODY_GRACE = 5.0  # seconds a request body may take before its rate counts
BODY_MIN_RATE = 8 * 1024  # bytes/s a request body must average after the grace
BODY_STALL = 15.0  # seconds a request body may send nothing at all
CONNECTION_CLOSE = (b"connection", b"close")
_TIMEOUT = "request body too slow"
_TIMEOUT_BODY = _TIMEOUT.encode() + b"\n"  # for HTTP/2 streams, written by hand


def _body_deadline(since: float, received: int, last: float) -> float:
    """When a request body that began at `since` and has `received` bytes, the last at
    `last`, must have sent more."""
    return min(since + BODY_GRACE + received / BODY_MIN_RATE, last + BODY_STALL)


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
        return headers  # callers copy it (chain/+) before adding their own


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-length" for name, _ in headers)


class LeanH11Protocol(H11Protocol):
    """HTTP/1.1 that writes a complete response's head and body with one socket write,
    and hands requests its `native` route accepts to it directly (no ASGI)."""

    _held = b""  # an encoded response head waiting for its body
    _body_since = -1.0  # when the request body in progress began (-1: none)
    _body_bytes = 0
    native: NativeRoute | None = None
    access: AccessLog | None = None  # writes the access log of native requests
    tcp: LeanTCPServer  # the connection (set by LeanTCPServer)

    async def _create_stream(self, request: h11.Request) -> None:
        length = None
        chunked = False
        for name, value in request.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if chunked and length is not None:
            # Either framing may be what an intermediary used: answer, then close, so no
            # byte after this head is read as a request (RFC 9112 6.3).
            return await self._refuse(400, "both Content-Length and Transfer-Encoding")
        route = self.native
        method = request.method.decode("ascii").upper()
        kind = route.takes(method, request.target) if route is not None else None
        # Shared SSE frames are written as HTTP/1.1 chunks: other versions go through ASGI.
        if kind is None or (kind == "stream" and request.http_version != b"1.1"):
            return await super()._create_stream(request)
        assert route is not None
        streams = kind == "stream"
        headers = list(request.headers)
        exchange = NativeExchange(
            self, route, method, request.target, headers, streams, self.access
        )
        self.stream = exchange  # type: ignore[assignment]
        self.keep_alive_requests += 1
        declared = int(length) if length is not None else 0
        # A large body is coming (or one of unknown size): a refused client would send it
        # in vain, and the gateway buffer it. A small one is read with the head anyway,
        # and decided with it once.
        if chunked or declared > EARLY_CHECK_BYTES:
            refused = route.refuse(method, request.target, headers)
            if refused is not None:
                return await exchange.refuse(refused)
        if declared > route.max_body_bytes:
            await exchange.refuse_too_large()

    async def _refuse(self, status: int, message: str) -> None:
        """Answer `status` before reading the body, and close the connection."""
        _, headers, body = error_answer(status, message, (CONNECTION_CLOSE,))
        await self.send_answer(status, headers, body, "POST")
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
        return _body_deadline(self._body_since, self._body_bytes, now)

    async def body_expired(self) -> None:
        """The request body stopped arriving: 408 if nothing was answered yet; close."""
        self._body_since = -1.0
        if self.connection.our_state is h11.SEND_RESPONSE:
            await self._refuse(408, _TIMEOUT)
        else:
            await self.send(Closed())

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200 and _has_length(event.headers):
            headers = list(chain(event.headers, self.config.response_headers("h11")))
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append(CONNECTION_CLOSE)
            self._held = self._encode(h11.Response(headers=headers, status_code=event.status_code))
            return
        if isinstance(event, Body):
            if len(event.data) >= SEPARATE_BODY_BYTES:  # its pieces, never joined
                await self._flush_held()
                for piece in self._encode_pieces(h11.Data(data=event.data)):
                    await self.send(RawData(data=piece))
                return
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
            headers.append(CONNECTION_CLOSE)
        head = self._encode(h11.Response(headers=headers, status_code=status))
        if body and not suppress_body(method, status):
            pieces = self._encode_pieces(h11.Data(data=body))
        else:
            pieces = []
        end = self._encode(h11.EndOfMessage())
        if len(body) < SEPARATE_BODY_BYTES or not pieces:
            data = b"".join(pieces)
            await self.send(RawData(data=head + data + end if data or end else head))
            return
        await self.send(RawData(data=head))
        for piece in pieces:  # the body as it is (chunked framing in pieces of its own)
            await self.send(RawData(data=piece))
        if end:
            await self.send(RawData(data=end))

    async def until_gone(self) -> None:
        """Return once the client has closed its side (or reset the connection), for a
        request answered inline while nobody reads the socket. Data from the client
        (a pipelined request) is left unread, and ends the watch: it cannot be both."""
        if self.ssl:
            return await self.tcp.until_gone_tls()
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
        """h11's bytes for `event`, joined (for heads and small bodies)."""
        pieces = self._encode_pieces(event)
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _encode_pieces(self, event: Any) -> list[bytes]:
        """h11's bytes for `event` as pieces; [] when the peer already broke the protocol
        (as hypercorn's own `_send_h11_event`). A large body stays a piece of its own:
        joining it to its chunk framing would copy it on the event loop."""
        try:
            # passthrough: h11 hands the body back as it is instead of joining a copy.
            # (After a websocket upgrade hypercorn's connection is an H11WSConnection,
            # which has no such method: a response body after an upgrade raises here.)
            return self.connection.send_with_data_passthrough(event) or []  # type: ignore[union-attr]
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return []


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
        bodies = (_body_deadline(s, int(r), last) for s, r, last in self._bodies.values())
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
            if _body_deadline(since, int(received), last) > now:
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

    def __init__(
        self,
        *args: Any,
        native: NativeRoute | None = None,
        tcp: Any = None,
        output: ConnectionOutput | None = None,
        access: AccessLog | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.output = output if output is not None else UNLIMITED.connection()
        if type(self.protocol) is H11Protocol:
            self.protocol = LeanH11Protocol(*self._protocol_args())
            self.protocol.native = native
            self.protocol.access = access
            self.protocol.tcp = tcp
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
        output: OutputBudget = UNLIMITED,
        access: AccessLog | None = None,
    ) -> None:
        super().__init__(*args)
        self._native = native
        self._access = access
        self.tls = isinstance(self.stream, trio.SSLStream)
        self._unread = b""  # under TLS: client bytes read while watching for its leaving
        self._connections = connections if connections is not None else Connections()
        self._keep_alive = float(self.config.keep_alive_timeout)  # a request head's limit
        self._between = float(getattr(self.config, "idle_timeout", self._keep_alive))
        self._idle_until = inf  # while idle: when the connection times out
        self._answered = False  # idle after a response (not a fresh connection)
        self._read_scope: trio.CancelScope | None = None
        self._write_scope: trio.CancelScope | None = None
        self.output = output.connection()  # response bytes queued for this client

    async def run(self) -> None:
        try:
            if self.tls:
                try:
                    with trio.fail_after(float(self.config.ssl_handshake_timeout)):
                        await self.stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError):
                    return  # no TLS session: nothing to serve (closed below)
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
                    native=self._native,
                    tcp=self,
                    output=self.output,
                    access=self._access,
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

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` in this connection's task group (ends with the connection); nothing
        when the connection is already closing (then there is nothing left to do)."""
        with contextlib.suppress(RuntimeError, AttributeError):  # closed / gone nursery
            self._task_group.spawn(fn)

    def stop_reading(self) -> None:
        """Shutdown: end this idle connection now rather than at its keep-alive deadline.
        Also how a connection is dropped: a write in progress is abandoned too."""
        if self._read_scope is not None:
            self._read_scope.cancel()
        if self._write_scope is not None:
            self._write_scope.cancel()

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
        if self._unread:
            data, self._unread = self._unread, b""
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def until_gone_tls(self) -> None:
        """`LeanH11Protocol.until_gone` under TLS, where the raw socket's bytes cannot be
        peeked at: read the TLS stream (this runs in the reader task, which is awaiting
        the answer). Bytes that arrive (a pipelined request) are kept for the reader,
        and end the watch."""
        try:
            data = await self.stream.receive_some(MAX_RECV)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if data:
            self._unread += bytes(data)
            await trio.sleep_forever()

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
        socket takes it. Shielded from the caller's cancellation (a half-written
        response cannot be taken back), but not from a socket that takes nothing for
        WRITE_TIMEOUT seconds or the connection being dropped: BrokenResourceError."""
        if self.tls:
            return await self._write_tls(data)
        fd = self.stream.socket.fileno()
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        if written == len(data):
            return
        view = memoryview(data)[written:]
        with trio.CancelScope(shield=True) as scope:
            self._write_scope = scope
            try:
                while view:
                    scope.deadline = trio.current_time() + WRITE_TIMEOUT
                    await trio.lowlevel.wait_writable(fd)
                    with contextlib.suppress(BlockingIOError):
                        view = view[os.write(fd, view) :]
            finally:
                self._write_scope = None
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("the client took no bytes in time, or was dropped")

    async def send_bytes(self, data: bytes) -> None:
        """Write `data` after any write in progress, outside the output budget (the
        caller counted it): how a native SSE client writes under TLS."""
        async with self.send_lock:
            await self._write(data)

    async def _write_tls(self, data: bytes) -> None:
        """`_write` through the TLS stream: each TLS_WRITE_PIECE must go out within
        WRITE_TIMEOUT (a cancelled TLS write breaks the stream: the connection ends)."""
        view = memoryview(data)
        with trio.CancelScope(shield=True) as scope:
            self._write_scope = scope
            try:
                for start in range(0, len(view), TLS_WRITE_PIECE):
                    scope.deadline = trio.current_time() + WRITE_TIMEOUT
                    await self.stream.send_all(view[start : start + TLS_WRITE_PIECE])
            finally:
                self._write_scope = None
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("the client took no bytes in time, or was dropped")


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
    finish (as hypercorn's `worker_serve`, which this follows). HTTP/1.1 requests `native`
    accepts skip ASGI; `access` logs them (the ASGI app logs its own, see
    `gateway.access`). `output`: the budget for response bytes queued for clients
    (default: unbounded)."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
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
            handler = partial(
                LeanTCPServer,
                wrapped,
                config,
                context,
                ConnectionState(lifespan_state.copy()),
                native=native,
                connections=connections,
                output=output if output is not None else UNLIMITED,
                access=access,
            )
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            handler,
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
                await context.terminated.set()
                connections.close_idle()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
