"""A small in-test TCP server speaking common/wire.py frames, standing in for a shard.

Used where the unit under test is the *client* side of the wire (common/rpc_client.py,
the gateway process): it lets a test script replies, delays, streams, drops and restarts.
Real shards are exercised by the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from common import wire

Reply = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Reply], Awaitable[None]]


async def answer_204(msg: dict[str, Any], reply: Reply) -> None:
    await reply({"k": "res", "i": msg["i"], "s": 204, "h": [], "b": b"", "more": False})


class FakeShard:
    """Listens on 127.0.0.1; every `req` runs `handler(msg, reply)` in its own task,
    cancelled when the client sends `cancel` for it."""

    def __init__(self, shard_id: str = "s1", handler: Handler = answer_204) -> None:
        self.shard_id = shard_id
        self.handler = handler
        self.port = 0
        self.hellos: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.cancelled: list[int] = []
        self.cancel_seen = trio.Event()
        self.frozen = False  # True: accept and read frames but answer nothing (not even hello)
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); start again with the same port for a 'restart'."""
        self._stopped = trio.Event()
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)
            await trio.serve_listeners(self._connection, listeners)
        self._stopped.set()

    async def stop(self) -> None:
        """Close the listener and every connection at once (like a crashed process)."""
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()

    async def _connection(self, stream: trio.SocketStream) -> None:
        lock = trio.Lock()
        decoder = wire.FrameDecoder()
        scopes: dict[int, trio.CancelScope] = {}

        async def reply(message: dict[str, Any]) -> None:
            async with lock:
                await stream.send_all(wire.encode(message))

        async def run_handler(msg: dict[str, Any]) -> None:
            with trio.CancelScope() as scope:
                scopes[msg["i"]] = scope
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.handler(msg, reply)
            scopes.pop(msg["i"], None)

        try:
            async with stream, trio.open_nursery() as nursery:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    for msg in decoder.feed(data):
                        if msg["k"] == "hello" and not self.frozen:
                            self.hellos.append(msg)
                            await reply(
                                {
                                    "k": "hello",
                                    "id": self.shard_id,
                                    "ring": msg.get("ring"),
                                }
                            )
                        elif self.frozen:
                            continue  # a hung peer: reads, never answers
                        elif msg["k"] == "req" and msg["op"] == "ping":
                            await reply({"k": "res", "i": msg["i"], "a": {}})
                        elif msg["k"] == "req":
                            self.requests.append(msg)
                            nursery.start_soon(run_handler, msg)
                        elif msg["k"] == "cancel":
                            self.cancelled.append(msg["i"])
                            self.cancel_seen.set()
                            scope = scopes.get(msg["i"])
                            if scope is not None:
                                scope.cancel()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def forever(msg: dict[str, Any], reply: Reply) -> None:
    await trio.sleep(math.inf)


def test_fake_shard_module_imports() -> None:
    """Keeps this helper module collected (and importable) by pytest."""
    assert FakeShard("x").shard_id == "x"
