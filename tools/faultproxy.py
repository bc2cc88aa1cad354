"""A small TCP fault proxy for tests: forward a port, then delay, cut, refuse or blackhole.

Put it between two processes (say a gateway and a shard: the gateway is told the shard
lives at the proxy's port) and switch faults on and off from the test, in-process:

    proxy = FaultProxy("127.0.0.1", shard_port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        proxy.delay = 0.2        # every byte arrives 200 ms later, both directions
        proxy.cut()              # reset every open connection (new ones still work)
        proxy.mode = "refuse"    # new connections are reset at once
        proxy.mode = "blackhole" # connections open, bytes vanish (a hung peer)
        proxy.heal()             # back to plain forwarding

Delay is latency, not a throughput cap: bytes are timestamped as they are read and
released when due, so a stream of small writes is not slowed down by the sum of delays.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Literal

import trio

Mode = Literal["forward", "refuse", "blackhole"]
_CHUNK = 65536


def _reset_on_close(stream: trio.SocketStream) -> None:
    """Make closing send RST instead of FIN: a broken link, not a polite goodbye."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.mode: Mode = "forward"
        self.delay = 0.0  # seconds added to every byte, each direction
        self.connections = 0  # accepted so far
        self.cuts = 0
        self._live: set[trio.CancelScope] = set()

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def cut(self) -> None:
        """Reset every open connection; the proxy keeps accepting new ones."""
        self.cuts += 1
        for scope in list(self._live):
            scope.cancel()

    def heal(self) -> None:
        self.mode = "forward"
        self.delay = 0.0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (on a free port unless `port` was set) and proxy until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        _reset_on_close(client)
        if self.mode == "refuse":
            await trio.aclose_forcefully(client)
            return
        scope = trio.CancelScope()
        self._live.add(scope)
        try:
            with scope:
                try:
                    server = await trio.open_tcp_stream(*self.target)
                except OSError:
                    await trio.aclose_forcefully(client)
                    return
                _reset_on_close(server)
                async with client, server, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, server, client, nursery.cancel_scope)
        finally:
            self._live.discard(scope)
            if scope.cancelled_caught:
                await trio.aclose_forcefully(client)

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        """Copy one direction; either side closing ends the whole connection."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](float("inf"))
        async with trio.open_nursery() as nursery:

            async def deliver() -> None:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    if self.mode == "blackhole":
                        continue
                    try:
                        await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                done.cancel()

            nursery.start_soon(deliver)
            try:
                while True:
                    try:
                        data = await source.receive_some(_CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        break
                    if self.mode != "blackhole":
                        send.send_nowait((trio.current_time() + self.delay, data))
            finally:
                send.close()  # deliver() flushes what is queued, then ends the connection
