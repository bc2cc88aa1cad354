"""A small in-test TCP server speaking common/wire.py frames, standing in for a shard.

Used where the unit under test is the *client* side of the wire (common/rpc_client.py,
the gateway process): it lets a test script replies, delays, streams, drops and restarts.
It authenticates as a real shard does (common/cluster_auth.py) with TEST_SECRET.
`ThreadedShard` runs one in its own thread and trio loop, for synchronous tests and for
fixtures that outlive one test. Real shards are exercised by the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from ds_cluster.common import wire
from ds_cluster.common.cluster_auth import AuthError, ServerHandshake
from support.auth import TEST_SECRET

Reply = Callable[[Any], Awaitable[None]]  # a frame dict, or raw bytes
Handler = Callable[[dict[str, Any], Reply], Awaitable[None]]


async def answer_204(msg: dict[str, Any], reply: Reply) -> None:
    await reply({"k": "res", "i": msg["i"], "s": 204, "h": [], "b": b"", "more": False})


class FakeShard:
    """Listens on 127.0.0.1; every `req` runs `handler(msg, reply)` in its own task,
    cancelled when the client sends `cancel` for it."""

    def __init__(
        self,
        shard_id: str = "s1",
        handler: Handler = answer_204,
        *,
        secret: bytes = TEST_SECRET,
        ring_version: int | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.secret = secret
        self.ring_version = ring_version  # None: whatever the caller says (always agree)
        self.handler = handler
        self.port = 0
        self.hellos: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.cancelled: list[int] = []
        self.cancel_seen = trio.Event()
        self.frozen = False  # True: accept and read frames but answer nothing (not even hello)
        self.health: dict[str, str] = {"storage": "ok"}
        self.wire_version = wire.WIRE_VERSION  # what its hello says (another: another build)
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
        handshake: ServerHandshake | None = None

        async def reply(message: dict[str, Any] | bytes) -> None:
            """Send a frame (bytes: sent as they are, for tests of hostile shards)."""
            async with lock:
                await stream.send_all(message if type(message) is bytes else wire.encode(message))

        async def run_handler(msg: dict[str, Any]) -> None:
            with trio.CancelScope() as scope:
                scopes[msg["i"]] = scope
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.handler(msg, reply)
            scopes.pop(msg["i"], None)

        try:
            async with stream, trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not data:
                        break
                    for msg in decoder.feed(data):
                        if self.frozen:
                            continue  # a hung peer: reads, never answers
                        if msg["k"] == "append":  # a plain append: the request it stands for
                            msg = wire.general_request(msg)
                        if msg["k"] in ("hello", "auth"):
                            if msg["k"] == "hello":
                                self.hellos.append(msg)
                                version = msg.get("r", 0)
                                if self.ring_version is not None:
                                    version = self.ring_version
                                ring = {
                                    "version": version,
                                    "shards": [self.shard_id],
                                    "endpoints": {},
                                }
                                handshake = ServerHandshake(
                                    self.secret, shard_id=self.shard_id, ring=ring
                                )
                            if handshake is None:
                                return
                            try:
                                if msg["k"] == "hello":
                                    hello = handshake.on_client_hello(msg)
                                    await reply({**hello, "v": self.wire_version})
                                else:
                                    await reply(handshake.on_auth(msg, self.health))
                            except AuthError:
                                return
                        elif msg["k"] == "req" and msg["op"] == "ping":
                            await reply({"k": "res", "i": msg["i"], "a": {"health": self.health}})
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


class ThreadedShard:
    """A FakeShard running in its own thread and trio loop (lives across tests)."""

    def __init__(self, shard: FakeShard) -> None:
        self.shard = shard
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.shard.run)
                ready.set()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self.shard.port

    def stop(self) -> None:
        trio.from_thread.run(self.shard.stop, trio_token=self._token)
        assert self._thread is not None
        self._thread.join(10)


@contextlib.contextmanager
def threaded_shard(script: Handler) -> Iterator[ThreadedShard]:
    """A FakeShard "s1" answering with `script`, running in its own thread until the
    block ends (a module-scoped fixture's usual shard)."""
    threaded = ThreadedShard(FakeShard("s1", script))
    threaded.start()
    try:
        yield threaded
    finally:
        threaded.stop()
