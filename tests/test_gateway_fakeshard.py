"""A small in-test TCP server speaking common/wire.py frames, standing in for a shard.

Used where the unit under test is the *client* side of the wire (common/rpc_client.py,
the gateway process): it lets a test script replies, delays, streams, drops and restarts.
It authenticates as a real shard does (common/cluster_auth.py) with TEST_SECRET; tests
that start processes by hand give them `write_secret_file(tmp_dir)`.
Real shards are exercised by the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from common import wire
from common.cluster_auth import AuthError, ClientHandshake, ServerHandshake

TEST_SECRET = b"test-cluster-secret-0123456789abcdef0123456789abcdef"


def write_secret_file(directory: Path, secret: bytes = TEST_SECRET) -> Path:
    """A cluster secret file (mode 0600) in `directory`, for processes a test starts."""
    path = directory / "cluster.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(secret)
    return path


def secret_args(directory: Path, secret: bytes = TEST_SECRET) -> list[str]:
    """`--cluster-secret-file FILE` for a shard or gateway command line."""
    return ["--cluster-secret-file", str(write_secret_file(directory, secret))]


Reply = Callable[[Any], Awaitable[None]]  # a frame dict, or raw bytes
Handler = Callable[[dict[str, Any], Reply], Awaitable[None]]


async def answer_204(msg: dict[str, Any], reply: Reply) -> None:
    await reply({"k": "res", "i": msg["i"], "s": 204, "h": [], "b": b"", "more": False})


async def open_authenticated(
    address: tuple[str, int],
    shard_id: str,
    *,
    secret: bytes = TEST_SECRET,
    ring_version: int = 1,
    role: str = "gateway",
    name: str = "test",
) -> tuple[trio.SocketStream, wire.FrameDecoder, wire.Frame]:
    """A raw wire connection to a real shard, authenticated as a gateway would be.

    Returns the stream, its decoder and the shard's `ready` frame (ring, health)."""
    stream = await trio.open_tcp_stream(*address)
    decoder = wire.FrameDecoder()
    frames: list[wire.Frame] = []

    async def receive() -> wire.Frame:
        while not frames:
            data = await stream.receive_some(65536)
            if not data:
                raise AuthError("authentication failed", "the shard closed the connection")
            frames.extend(decoder.feed(data))
        return frames.pop(0)

    ring: wire.RingInfo = {"version": ring_version, "shards": []}
    handshake = ClientHandshake(secret, role=role, name=name, shard_id=shard_id, ring=ring)
    with trio.fail_after(10):
        await stream.send_all(wire.encode(handshake.hello()))
        await stream.send_all(wire.encode(handshake.on_server_hello(await receive())))
        ready = await receive()
        handshake.on_ready(ready)
    assert not frames
    return stream, decoder, ready


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
                        if msg["k"] in ("hello", "auth"):
                            if msg["k"] == "hello":
                                self.hellos.append(msg)
                                version = msg.get("r", 0)
                                if self.ring_version is not None:
                                    version = self.ring_version
                                ring = {"version": version, "shards": [self.shard_id]}
                                handshake = ServerHandshake(
                                    self.secret, shard_id=self.shard_id, ring=ring
                                )
                            if handshake is None:
                                return
                            try:
                                if msg["k"] == "hello":
                                    await reply(handshake.on_client_hello(msg))
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


def test_fake_shard_module_imports() -> None:
    """Keeps this helper module collected (and importable) by pytest."""
    assert FakeShard("x").shard_id == "x"
