"""The test cluster's secret, and what a test needs to use it.

Shards and gateways refuse to start without a cluster secret, and every RPC connection
proves it holds the secret (common/cluster_auth.py). Tests that start processes by hand
give them `secret_args(tmp_dir)`; a test that speaks the wire to a real shard itself
opens its connection with `open_authenticated`.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from ds_cluster.common import wire
from ds_cluster.common.cluster_auth import AuthError, ClientHandshake

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


def env_without_secret() -> dict[str, str]:
    """The environment without any cluster secret or RPC option (so a test chooses them)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DS_CLUSTER_", "DS_RPC_"))}


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
