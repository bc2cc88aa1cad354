"""The gateway's native route: stream requests served on the HTTP/1.1 connection itself.

`gateway.server` hands the requests its `NativeRoute` takes to a `NativeExchange` instead
of hypercorn's HTTPStream and the ASGI app. Whole answers (appends, reads, long-polls) are
awaited inline in the connection's reader task: no task, memory channel or ASGI message
per request. SSE reads join a shared upstream (`gateway.fanout`) and are then written by
an `SseClient`, with no task of their own.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Protocol

import trio
from hypercorn.events import Closed
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.utils import suppress_body

from ds_cluster.common import bigjoin
from ds_cluster.gateway import metrics as gateway_metrics
from ds_cluster.gateway.access import CLIENT_GONE, REQUEST_ID, AccessLog, request_id
from ds_cluster.gateway.answers import Answer, body_too_large
from ds_cluster.gateway.budget import MAX_BEHIND, WRITE_TIMEOUT, ConnectionOutput
from ds_cluster.gateway.fanout import Streaming, Subscriber

log = logging.getLogger(__name__)
# After an early answer (a 413, a refused token) the rest of the request body is read and
# dropped, at most this much for this long: closing a socket with unread bytes sends a TCP
# reset, and a client still sending then loses the answer it was sent.
DRAIN_LIMIT = 16 * 1024 * 1024
DRAIN_TIME = 10.0  # seconds


class Connection(Protocol):
    """What an `SseClient` needs of its client connection (`gateway.server.LeanTCPServer`):
    described here so that this module does not import the server that imports it."""

    @property
    def stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]: ...

    @property
    def output(self) -> ConnectionOutput:
        """Response bytes queued for this client."""

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` in a task of the connection (nothing if it is closing)."""

    def stop_reading(self) -> None:
        """Drop the connection: stop reading, abandon a write in progress."""

    @property
    def tls(self) -> bool:
        """Whether the connection is TLS (no raw-socket writes then)."""

    async def send_bytes(self, data: bytes) -> None:
        """Write `data` after the connection's other writes; BrokenResourceError when the
        client is gone or takes nothing for WRITE_TIMEOUT seconds."""


class H11Connection(Protocol):
    """What a `NativeExchange` needs of the HTTP/1.1 protocol it answers on
    (`gateway.server.LeanH11Protocol`)."""

    @property
    def tcp(self) -> Connection: ...

    @property
    def send(self) -> Callable[[Closed], Awaitable[None]]: ...

    async def stream_send(self, event: StreamEvent) -> None: ...

    async def send_answer(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, method: str
    ) -> None: ...

    async def until_gone(self) -> None: ...


class NativeRoute(Protocol):
    """Requests answered without ASGI: whole body in, whole answer out."""

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
    ) -> Answer | None:
        """The complete answer, or None when the client left while it was awaited (the
        route learns that by awaiting `until_gone`, which returns when the client has
        closed its side). Must not raise for bad input (an error Answer instead)."""

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

    def error(self, status: int, message: str) -> Answer:
        """An error rendered as the route renders its own (413, 500 from here)."""

    def refuse(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Answer | None:
        """An answer to give at the head of a request with a large body (or a chunked one),
        before the body is read (a refused client token), or None to read it and go on."""


class NativeExchange:
    """One request on the native route. Stands where hypercorn's HTTPStream would: it
    gathers the body from the protocol's events and answers inline, in the connection's
    reader task (HTTP/1.1 has one request at a time anyway), so a request costs no
    task, channel or ASGI messages.

    A body over the limit is answered 413 at once; the rest of it is then read and
    dropped (up to DRAIN_LIMIT bytes within DRAIN_TIME seconds, and at the body's
    minimum rate) before the connection is reused, or closed when the rest is more, so
    the client reads the 413 instead of a connection reset.

    Every answer carries the request's X-Request-Id; with an `access` log, the exchange
    writes its line once answered (an SSE read: once it ends)."""

    idle = False

    def __init__(
        self,
        protocol: H11Connection,
        route: NativeRoute,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        streams: bool = False,
        access: AccessLog | None = None,
    ) -> None:
        self._protocol = protocol
        recorder = gateway_metrics.current  # None: metrics are off
        self._metric: gateway_metrics.Exchange | None = None
        if recorder is not None:
            live = (
                "sse" if streams else gateway_metrics.live_label(method, target.partition(b"?")[2])
            )
            scheme = "https" if getattr(protocol, "ssl", False) else "http"
            self._metric = recorder.exchange(method, scheme, live)
        self._answered = 0  # the status sent, for metrics (0: none yet)
        self._rid = request_id(headers)
        self._access = access
        self._started = perf_counter() if access is not None else 0.0
        self._status = 0  # of a streamed response, logged when it ends
        self._client: SseClient | None = None
        self._route = route
        self._method = method
        self._target = target
        self._headers = headers
        self._streams = streams  # an SSE read, served by `route.stream`
        self._parts: list[bytes] = []
        self._size = 0
        self._draining = False  # answered early; dropping the rest of the body
        self._drain_until = 0.0  # when dropping it stops (the connection closes then)
        self._done = False
        self._leave: Callable[[], None] | None = None  # leaves the shared upstream

    async def handle(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed):
            self._end_metric()
            self._done = True
            if self._leave is not None:
                self._leave()
                self._log_stream()
            return
        if self._done:
            return
        if isinstance(event, Body):
            self._size += len(event.data)
            if self._draining:
                if self._size > DRAIN_LIMIT or trio.current_time() > self._drain_until:
                    await self._finish()  # not worth reading: the connection closes
            elif self._size > self._route.max_body_bytes:
                await self.refuse_too_large()
            else:
                self._parts.append(bytes(event.data))
        elif isinstance(event, EndBody):
            if self._draining:
                return await self._finish()
            parts, self._parts = self._parts, []
            body = await bigjoin.join(parts, self._size)  # a large body: off the loop
            del parts  # the pieces are garbage now; the answer may take a while
            if self._streams:
                return await self._start_stream(body)
            try:
                answer = await self._route.answer(
                    self._method, self._target, self._headers, body, self._protocol.until_gone
                )
            except Exception:
                self._log_failure()
                answer = self._route.error(500, "internal error")
            if answer is None:  # the client left: nothing to write, the connection ends
                if self._access is not None:
                    self._log(CLIENT_GONE, 0)
                self._done = True
                await self._protocol.send(Closed())
                return
            await self._send_answer(answer)
            await self._finish()

    async def _start_stream(self, body: bytes) -> None:
        """Join the shared upstream, write the head, and hand the socket to an
        `SseClient`. The exchange then stays open, with no task of its own, until the
        upstream ends it or the connection closes (StreamClosed)."""
        client = self._client = SseClient(self._protocol.tcp, self._end_stream)
        try:
            result = await self._route.stream(
                self._method, self._target, self._headers, body, client
            )
        except Exception:
            self._log_failure()
            result = self._route.error(500, "internal error")
        self._headers = []  # an SSE response may be held for minutes: keep nothing
        if not isinstance(result, Streaming):
            await self._send_answer(result)
            return await self._finish()
        self._leave = result.leave
        self._answered = result.status
        self._status = result.status
        # No Content-Length: h11 frames the body in chunks, and the head goes out at once.
        headers = [*result.headers, (REQUEST_ID, self._rid)]
        await self._protocol.stream_send(
            Response(stream_id=1, headers=headers, status_code=result.status)
        )
        client.start(result.prefix)

    async def _end_stream(self) -> None:
        """The upstream ended and the client has every byte: end the chunked body; the
        connection is then reused (keep-alive) as after any response."""
        if not self._done:
            await self._protocol.stream_send(EndBody(stream_id=1))
            self._log_stream()
            await self._finish()

    async def refuse_too_large(self) -> None:
        """Answer 413 now; drain what follows."""
        await self.refuse(self._route.error(413, body_too_large(self._route.max_body_bytes)))

    async def refuse(self, answer: Answer) -> None:
        """Answer now, before the body is read; drain what follows (up to DRAIN_LIMIT
        bytes within DRAIN_TIME seconds), so that the client, which may still be sending
        it, reads the answer rather than a reset. Even a declared size over DRAIN_LIMIT
        is drained that far: by then the client has had the answer for a while."""
        await self._send_answer(answer)
        self._parts = []
        self._size = 0
        self._draining = True
        self._drain_until = trio.current_time() + DRAIN_TIME

    async def _send_answer(self, answer: Answer) -> None:
        status, headers, body = answer
        self._answered = status
        headers = [*headers, (REQUEST_ID, self._rid)]
        await self._protocol.send_answer(status, headers, body, self._method)
        if self._access is not None:
            sent = 0 if suppress_body(self._method, status) else len(body)
            self._log(status, sent)

    def _log(self, status: int, sent: int) -> None:
        assert self._access is not None
        path = self._target.partition(b"?")[0].decode("latin-1")
        self._access.write(
            self._rid, self._method, path, status, self._started, self._size, sent, "native"
        )

    def _log_failure(self) -> None:
        """The route raised: log it with the request's id (the client gets it in the 500)."""
        rid = self._rid.decode("ascii")
        extra = {"request_id": rid}
        log.exception("native route failed on %s %r", self._method, self._target, extra=extra)

    def _log_stream(self) -> None:
        """The access line of an SSE read, once it is over (the first call only)."""
        if self._access is not None and self._client is not None:
            self._log(self._status, self._client.sent)
            self._client = None

    async def _finish(self) -> None:
        """The exchange is over: the protocol recycles the connection (or closes it when
        the request body was not read to its end)."""
        self._end_metric()
        self._done = True
        await self._protocol.stream_send(StreamClosed(stream_id=1))

    def _end_metric(self) -> None:
        """The request is over for metrics (the first call only)."""
        metric, self._metric = self._metric, None
        if metric is not None:
            metric.end(self._answered)


class SseClient:
    """A connection's end of a shared SSE upstream (`gateway.fanout.Subscriber`).

    Frames arrive from the upstream's task and are written straight to the socket with a
    non-blocking write: no task per client. What the socket does not take is queued and
    written by a flusher task started only then. The queue counts against the
    connection's output budget (`gateway.budget`); a client more than MAX_BEHIND bytes
    behind, over budget, or whose socket takes nothing for WRITE_TIMEOUT seconds is
    dropped (its connection closes; SSE clients resume from their last offset).
    When the upstream ends, the response is ended once everything is written, and the
    connection is reused like after any other response. Under TLS, where a write cannot
    go to the socket without yielding, the flusher task writes every frame in order.
    """

    __slots__ = (
        "_dropped",
        "_ended",
        "_flushing",
        "_live",
        "_on_end",
        "_queue",
        "_queued",
        "_tcp",
        "sent",
    )

    def __init__(self, tcp: Connection, on_end: Callable[[], Awaitable[None]]) -> None:
        self._tcp = tcp
        self._on_end = on_end  # ends the response (in a task) once everything is written
        self._queue: deque[bytes] = deque()  # not yet written, in order
        self._queued = 0
        self._live = False  # the head is written: frames may go to the socket
        self._ended = False  # the upstream is over
        self._dropped = False  # the client fell too far behind (or went): no more writes
        self._flushing = False
        self.sent = 0  # bytes written to the socket (for the access log)

    def start(self, prefix: bytes) -> None:
        """The head is written: write `prefix`, then what was delivered meanwhile."""
        if prefix:
            if not self._tcp.output.admit(len(prefix)):
                return self._drop()
            self._queue.appendleft(prefix)
            self._queued += len(prefix)
        self._live = True
        self._write_queued()

    def deliver(self, frame: bytes) -> None:
        if self._ended:
            return
        if self._queued > MAX_BEHIND or not self._tcp.output.admit(len(frame)):
            return self._drop()
        self._queue.append(frame)
        self._queued += len(frame)
        if self._live and not self._flushing:
            self._write_queued()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._live and not self._flushing:
            self._write_queued()

    def _write_queued(self) -> None:
        """Write what the socket takes now; the flusher waits for room for the rest."""
        if self._dropped:
            return
        if self._tcp.tls:
            if self._queue:
                self._flushing = True
                self._tcp.spawn(self._flush_tls)
            elif self._ended:
                self._tcp.spawn(self._on_end)
            return
        fd = self._tcp.stream.socket.fileno()
        queue = self._queue
        output = self._tcp.output
        try:
            while queue:
                data = queue[0]
                written = os.write(fd, data)
                self.sent += written
                self._queued -= written
                output.release(written)
                if written < len(data):
                    queue[0] = data[written:]
                    break
                queue.popleft()
        except BlockingIOError:
            pass
        except OSError:  # the client is gone; its connection is closing
            return self._drop()
        if queue:
            self._flushing = True
            self._tcp.spawn(self._flush)
        elif self._ended:
            self._tcp.spawn(self._on_end)

    async def _flush(self) -> None:
        try:
            with trio.move_on_after(WRITE_TIMEOUT) as stalled:
                await self._tcp.stream.socket.wait_writable()
        except (OSError, trio.ClosedResourceError):
            return self._drop()
        finally:
            self._flushing = False
        if stalled.cancelled_caught:
            return self._drop()
        self._write_queued()

    async def _flush_tls(self) -> None:
        """Write the queue through the TLS stream until it is empty (frames delivered
        meanwhile included), then end the response if the upstream has ended."""
        queue = self._queue
        try:
            while queue and not self._dropped:
                data = queue.popleft()
                try:
                    await self._tcp.send_bytes(data)
                finally:
                    self._queued -= len(data)
                    self._tcp.output.release(len(data))
                self.sent += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return self._drop()
        finally:
            self._flushing = False
        if self._ended and not self._dropped:
            self._tcp.spawn(self._on_end)

    def _drop(self) -> None:
        if not self._dropped:
            log.info("SSE client dropped: %d bytes behind", self._queued)
        self._dropped = self._ended = True
        self._queue.clear()
        self._tcp.output.release(self._queued)
        self._queued = 0
        self._tcp.stop_reading()
