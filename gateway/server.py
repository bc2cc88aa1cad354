"""Hypercorn's HTTP protocol classes behind a leaner per-connection loop.

`hypercorn.trio.serve` spends most of a small request's CPU outside the application: per
request it restarts an idle-timeout task (a lock, a cancelled task and a new one), takes
a lock around every socket write, writes the response head and body with separate
`send` calls and yields once more for the empty end-of-message write. On a gateway whose
whole job is small requests that is most of the budget. `serve` here keeps hypercorn's
parsing, ASGI adaptation, HTTP/2 handling and configuration, and changes only how a
connection is driven:

- one idle watchdog task per connection whose deadline is moved, instead of a new task
  per request;
- a complete response (one with a Content-Length) goes out in one write, head and body
  together; streamed responses (SSE) still send their head at once;
- empty writes are skipped, and the send lock is taken without yielding when it is free.

The listening loop, graceful shutdown and lifespan handling follow hypercorn's
`worker_serve`. Plain TCP only (the gateway terminates no TLS; HTTP/2 still works with
prior knowledge or an h2c upgrade, through hypercorn's own classes).
"""

from __future__ import annotations

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
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import (
    ShutdownError,
    parse_socket_addr,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)


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
    """HTTP/1.1 that writes a complete response's head and body with one socket write."""

    _held = b""  # an encoded response head waiting for its body

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
            data = self._held + data
            self._held = b""
        if data:
            await self.send(RawData(data=data))

    async def _flush_held(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            await self.send(RawData(data=data))

    def _encode(self, event: Any) -> bytes:
        """h11's bytes for `event`; b"" when the peer already broke the protocol (as
        hypercorn's own `_send_h11_event`)."""
        try:
            return self.connection.send(event) or b""
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return b""


class _Protocols(ProtocolWrapper):
    """hypercorn's protocol selection, with the lean HTTP/1.1 class in place of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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


class LeanTCPServer(TCPServer):
    """One client connection: hypercorn's `TCPServer` with a movable idle deadline and
    lock-free writes when nobody else is writing."""

    _idle: trio.CancelScope | None = None
    _closing = False  # the client side has ended; nothing left for the watchdog to do

    async def run(self) -> None:
        socket = self.stream.socket
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
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
                )
                await self.protocol.initiate()
                self._idle = trio.CancelScope(deadline=trio.current_time() + self._keep_alive)
                task_group.spawn(self._watch_idle, self._idle)
                await self._read_data()
                self._closing = True
                self._idle.cancel()
        except OSError:
            pass
        finally:
            await self._close()

    @property
    def _keep_alive(self) -> float:
        return float(self.config.keep_alive_timeout)

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
            if self._idle is not None:
                self._idle.deadline = trio.current_time() + self._keep_alive if event.idle else inf
        else:
            await super().protocol_send(event)

    async def _watch_idle(self, scope: trio.CancelScope) -> None:
        """Close the connection once it has been idle for keep_alive_timeout, or when the
        server shuts down while it is idle; a connection busy at shutdown is closed by the
        protocol after its response (hypercorn checks `context.terminated` then)."""
        with scope:
            await self.context.terminated.wait()
        if not self._closing and (scope.cancelled_caught or scope.deadline != inf):
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()


async def serve(
    app: Callable[..., Awaitable[None]],
    config: Config,
    listeners: list[trio.SocketListener],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI `app` on plain-TCP `listeners` until `shutdown_trigger` returns, then
    give connections `config.graceful_timeout` seconds to finish (as hypercorn's
    `worker_serve`, which this follows)."""
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
            handler = partial(
                LeanTCPServer, wrapped, config, context, ConnectionState(lifespan_state.copy())
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
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
