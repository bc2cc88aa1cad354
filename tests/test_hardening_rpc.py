"""The cluster's RPC is authenticated and untrusting (real shard and gateway processes).

Covers: an unauthenticated hello gets nothing; a wrong secret is refused both ways; an
impostor on a shard's port is refused and named by /readyz; a `cancel` with a list id
costs only its connection; unread replies, unread pings and a half-sent large frame are
dropped within their bounds with the shard's memory bounded; the ring-version fence;
TLS on the RPC links; no secret (or a careless one) and no start.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
from support.auth import (
    TEST_SECRET,
    env_without_secret,
    open_authenticated,
    secret_args,
    write_secret_file,
)
from support.fakeshard import FakeShard, Reply, ThreadedShard, answer_204
from support.processes import GatewayProcess, ShardProcess, free_port

from ds_cluster.common import rpc_security, wire
from ds_cluster.common.cluster_auth import AuthError, ClientHandshake, ServerHandshake
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_security import SECRET_FILE_NAME, ensure_secret_file, read_secret_file
from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor, SupervisorError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
JSON_TYPE = "application/json"
WRONG_SECRET = b"not-the-cluster-secret-0123456789abcdef0123456789"
MIB = 1024 * 1024


@contextmanager
def shard_process(tmp: Path, shard_id: str = "shard-0", *extra: str, **kw: Any) -> Iterator:
    shard = ShardProcess(tmp, shard_id, *secret_args(tmp), *extra, **kw)
    try:
        yield shard
    finally:
        shard.stop()


def wait_problems(gateway: GatewayProcess, expected: dict[str, str], timeout: float = 10) -> dict:
    """/readyz once it names exactly `expected` (a fresh gateway first says "not connected
    yet"); it must answer 503 then."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{gateway.url}/readyz")
        body = response.json()
        if body.get("shards") == expected:
            assert response.status_code == 503 and body["ready"] is False
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def request(i: int, method: str, path: str, body: bytes = b"", r: int = 1) -> dict[str, Any]:
    return {
        "k": "req",
        "i": i,
        "r": r,
        "op": "http",
        "m": method,
        "p": path,
        "q": "",
        "h": [["content-type", JSON_TYPE]],
        "b": body,
    }


async def receive_frame(stream: trio.SocketStream, decoder: wire.FrameDecoder) -> wire.Frame:
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            assert data, "the shard closed a healthy connection"
            frames = decoder.feed(data)
            if frames:
                assert len(frames) == 1, frames
                return frames[0]


async def call(stream: trio.SocketStream, decoder: wire.FrameDecoder, frame: dict) -> wire.Frame:
    await stream.send_all(wire.encode(frame))
    return await receive_frame(stream, decoder)


async def closed_within(stream: trio.abc.Stream, seconds: float) -> list[bytes]:
    """Read until the peer closes (EOF or reset) within `seconds`; returns what came."""
    received: list[bytes] = []
    try:
        with trio.fail_after(seconds):
            while True:
                try:
                    data = await stream.receive_some(1024 * 1024)
                except trio.BrokenResourceError:
                    return received
                if not data:
                    return received
                received.append(data)
    finally:
        await trio.aclose_forcefully(stream)


async def assert_serves(shard: ShardProcess, path: str = "still-serving") -> None:
    """The shard process lives and a fresh authenticated connection gets answers."""
    assert shard.alive(), "".join(shard.lines[-30:])
    stream, decoder, _ = await open_authenticated(shard.address, shard.shard_id)
    answer = await call(stream, decoder, request(1, "PUT", path))
    assert answer["k"] == "res" and answer["s"] in (200, 201), answer
    await trio.aclose_forcefully(stream)


# ---- the handshake, as pure code --------------------------------------------------------


def _roundtrip(frame: dict) -> wire.Frame:
    return wire.FrameDecoder().feed(wire.encode(dict(frame)))[0]


RING: wire.RingInfo = {"version": 1, "shards": ["shard-0", "shard-1"], "endpoints": {}}


def test_handshake_state_machines_agree_and_refuse_what_they_should() -> None:
    client = ClientHandshake(TEST_SECRET, role="gateway", name="g", shard_id="shard-0", ring=RING)
    server = ServerHandshake(TEST_SECRET, shard_id="shard-0", ring=RING)
    server_hello = _roundtrip(server.on_client_hello(_roundtrip(client.hello())))
    assert "ring" not in server_hello  # nothing about the cluster before the caller's proof
    auth = _roundtrip(client.on_server_hello(server_hello))
    ready = _roundtrip(server.on_auth(auth, {"storage": "ok"}))
    assert client.on_ready(ready) == {"storage": "ok"} and client.peer_ring == RING

    # A shard without the secret cannot prove itself; one with another id is refused.
    for secret, shard_id, reason in [
        (WRONG_SECRET, "shard-0", "authentication failed"),
        (TEST_SECRET, "shard-1", "claims to be 'shard-1'"),
    ]:
        client = ClientHandshake(
            TEST_SECRET, role="gateway", name="g", shard_id="shard-0", ring=RING
        )
        impostor = ServerHandshake(secret, shard_id=shard_id, ring=RING)
        with pytest.raises(AuthError) as refused:
            client.on_server_hello(_roundtrip(impostor.on_client_hello(_roundtrip(client.hello()))))
        assert refused.value.reason == reason

    # The shard's own proof reflected back as the caller's does not verify.
    client = ClientHandshake(TEST_SECRET, role="gateway", name="g", shard_id="shard-0", ring=RING)
    server = ServerHandshake(TEST_SECRET, shard_id="shard-0", ring=RING)
    server_hello = _roundtrip(server.on_client_hello(_roundtrip(client.hello())))
    with pytest.raises(AuthError):
        server.on_auth(_roundtrip({"k": "auth", "mac": server_hello["mac"]}), {})

    # A proof recorded on one connection does not verify on the next (fresh nonces).
    recorded = _roundtrip(client.on_server_hello(server_hello))
    replayed_to = ServerHandshake(TEST_SECRET, shard_id="shard-0", ring=RING)
    replayed_to.on_client_hello(_roundtrip(client.hello()))
    with pytest.raises(AuthError):
        replayed_to.on_auth(recorded, {})


# ---- finding 1: no authentication ---------------------------------------------------------


async def test_unauthenticated_hello_gets_no_ring_no_data_and_is_closed(tmp_path: Path) -> None:
    with shard_process(tmp_path) as shard:
        # A hello that never proves anything: the shard's hello carries no ring, and a
        # request sent instead of the proof is not served; the connection is closed.
        stream = await trio.open_tcp_stream(*shard.address)
        hello = {"k": "hello", "role": "gateway", "id": "x", "nonce": os.urandom(32), "r": 1}
        await stream.send_all(wire.encode(hello))
        await stream.send_all(wire.encode(request(1, "PUT", "stolen", b"")))
        received = b"".join(await closed_within(stream, 10))
        frames = wire.FrameDecoder().feed(received)
        assert [f["k"] for f in frames] == ["hello"]
        assert "ring" not in frames[0]

        # Silence after the hello: dropped at the handshake deadline.
        stream = await trio.open_tcp_stream(*shard.address)
        await stream.send_all(wire.encode(dict(hello, nonce=os.urandom(32))))
        started = time.monotonic()
        await closed_within(stream, 15)
        assert time.monotonic() - started < 10

        # Large frames are not accepted before authentication.
        stream = await trio.open_tcp_stream(*shard.address)
        await stream.send_all(struct.pack(">I", 10 * MIB) + b"\x00" * 65536)
        assert await closed_within(stream, 5) == []

        # The stream the intruder tried to create does not exist.
        good, decoder, _ = await open_authenticated(shard.address, "shard-0")
        answer = await call(good, decoder, request(2, "HEAD", "stolen"))
        assert answer["k"] == "res" and answer["s"] == 404
        await trio.aclose_forcefully(good)
        await assert_serves(shard)


async def test_wrong_secret_refused_both_directions(tmp_path: Path) -> None:
    with shard_process(tmp_path) as shard:
        # The caller refuses the shard: with our (wrong) secret its proof does not verify.
        with pytest.raises(AuthError) as refused:
            await open_authenticated(shard.address, "shard-0", secret=WRONG_SECRET)
        assert refused.value.reason == "authentication failed"

        # The shard refuses a caller that cannot prove the secret: no `ready`, closed.
        stream = await trio.open_tcp_stream(*shard.address)
        decoder = wire.FrameDecoder()
        client = ClientHandshake(
            WRONG_SECRET, role="gateway", name="x", shard_id="shard-0", ring=RING
        )
        server_hello = await call(stream, decoder, client.hello())
        assert server_hello["k"] == "hello"
        await stream.send_all(wire.encode({"k": "auth", "mac": os.urandom(32)}))
        await stream.send_all(wire.encode(request(1, "PUT", "nope")))
        assert await closed_within(stream, 10) == []

        # A gateway with the wrong secret does not use the shard, and says so.
        bad_secret_dir = tmp_path / "bad"
        bad_secret_dir.mkdir()
        gateway = GatewayProcess(
            f"shard-0=127.0.0.1:{shard.port}", *secret_args(bad_secret_dir, WRONG_SECRET)
        )
        try:
            ready = wait_problems(gateway, {"shard-0": "authentication failed"})
            assert ready["disconnected"] == ["shard-0"]
            assert httpx.put(f"{gateway.url}/v1/stream/x").status_code == 503
        finally:
            assert gateway.stop() == 0
        await assert_serves(shard)


# ---- finding 3: impostor shard ------------------------------------------------------------


def test_impostor_on_a_shard_port_is_refused_and_named_by_readyz(tmp_path: Path) -> None:
    """A process that took shard-1's port (it claims to be shard-1, answers 204 to
    everything) but does not hold the secret: never used, never acknowledged."""
    impostor = ThreadedShard(FakeShard("shard-1", answer_204, secret=WRONG_SECRET))
    impostor_port = impostor.start()
    port0 = free_port()
    peers = f"shard-0=127.0.0.1:{port0},shard-1=127.0.0.1:{impostor_port}"
    shard0 = ShardProcess(tmp_path, "shard-0", *secret_args(tmp_path), port=port0, peers=peers)
    gateway = GatewayProcess(peers)
    try:
        wait_problems(gateway, {"shard-1": "authentication failed"})

        ring = Ring(1, ("shard-0", "shard-1"))
        on_impostor = [p for p in (f"s-{n}" for n in range(200)) if ring.owner(p) == "shard-1"]
        on_real = [p for p in (f"s-{n}" for n in range(200)) if ring.owner(p) == "shard-0"]
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            for path in on_impostor[:20]:
                created = client.put(f"/v1/stream/{path}", headers={"content-type": JSON_TYPE})
                appended = client.post(
                    f"/v1/stream/{path}", headers={"content-type": JSON_TYPE}, content=b"[1]"
                )
                assert created.status_code >= 500 and appended.status_code >= 500
            # The real shard serves as ever.
            path = on_real[0]
            assert client.put(f"/v1/stream/{path}", headers={"content-type": JSON_TYPE}).is_success
        assert impostor.shard.requests == []  # it never saw a single request
    finally:
        assert gateway.stop() == 0
        shard0.stop()
        impostor.stop()


def test_a_shard_that_claims_another_id_is_not_used() -> None:
    """Even with the secret, a shard answering on shard-1's address as someone else (a
    misconfigured address list) is not routed to; /readyz says who it claims to be."""
    other = ThreadedShard(FakeShard("shard-9"))
    port = other.start()
    gateway = GatewayProcess(f"shard-1=127.0.0.1:{port}")
    try:
        wait_problems(gateway, {"shard-1": "claims to be 'shard-9'"})
        assert httpx.put(f"{gateway.url}/v1/stream/x").status_code == 503
        assert other.shard.requests == []
    finally:
        assert gateway.stop() == 0
        other.stop()


# ---- finding 2: one frame kills a shard ------------------------------------------------------


async def test_cancel_with_a_list_id_costs_only_its_connection(tmp_path: Path) -> None:
    with shard_process(tmp_path) as shard:
        good, decoder, _ = await open_authenticated(shard.address, "shard-0")
        assert (await call(good, decoder, request(1, "PUT", "kept")))["s"] == 201
        for n in range(20):
            bad, _, _ = await open_authenticated(shard.address, "shard-0")
            await bad.send_all(wire.encode({"k": "cancel", "i": [1, 2, n]}))
            await closed_within(bad, 10)
        for hostile in (
            {"k": "cancel", "i": {"a": 1}},
            {"k": "req", "i": 5, "r": 1, "op": ["http"]},
            {"k": "req", "i": 5, "r": "1", "op": "ping"},
            {"k": "res", "i": 1, "s": 200},
            {"k": "hello", "role": "gateway", "id": "again", "nonce": b"n" * 32, "r": 1},
        ):
            bad, _, _ = await open_authenticated(shard.address, "shard-0")
            await bad.send_all(wire.encode(hostile))
            await closed_within(bad, 10)
        # The first connection, open all along, still works; so does the process.
        answer = await call(good, decoder, request(2, "POST", "kept", b"[1]"))
        assert answer["k"] == "res" and answer["s"] == 204, answer
        await trio.aclose_forcefully(good)
        await assert_serves(shard)


async def test_pipelined_appends_commit_in_arrival_order_and_are_answered_once(
    tmp_path: Path,
) -> None:
    """Appends decided on the spot (no task each): many in one read, half of them
    cancelled right behind, are each answered once, after their commit, and land in the
    order they arrived; an id reused while its append commits costs the connection."""
    count = 300
    with shard_process(tmp_path) as shard:
        stream, decoder, _ = await open_authenticated(shard.address, "shard-0")
        assert (await call(stream, decoder, request(1, "PUT", "piped")))["s"] == 201
        appends = [wire.encode(request(10 + n, "POST", "piped", b"[%d]" % n)) for n in range(count)]
        cancels = [wire.encode({"k": "cancel", "i": 10 + n}) for n in range(0, count, 2)]
        await stream.send_all(b"".join(appends + cancels))
        answers: dict[int, wire.Frame] = {}
        with trio.fail_after(30):
            while len(answers) < count:
                data = await stream.receive_some(1024 * 1024)
                assert data, "the shard closed a healthy connection"
                for frame in decoder.feed(data):
                    assert frame["i"] not in answers, frame
                    answers[frame["i"]] = frame
        tails = []
        for n in range(count):
            answer = answers[10 + n]
            assert answer["k"] == "res" and answer["s"] == 204, answer
            tails.append(dict(map(tuple, answer["h"]))["stream-next-offset"])
        assert tails == sorted(tails) and len(set(tails)) == count
        read = await call(stream, decoder, request(2, "GET", "piped"))
        assert read["s"] == 200 and json.loads(read["b"]) == list(range(count))
        twice = wire.encode(request(3, "POST", "piped", b"[0]"))
        await stream.send_all(twice + twice)
        await closed_within(stream, 10)
        await assert_serves(shard)


# ---- finding 6, the shard's RPC port: bounded memory ---------------------------------------


async def test_a_million_unread_pings_are_dropped_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    with shard_process(tmp_path) as shard:
        stream, _, _ = await open_authenticated(shard.address, "shard-0")
        before = shard.status_kib("VmRSS")
        ping = wire.encode({"k": "req", "i": 7, "r": 1, "op": "ping", "a": {}})
        batch = ping * 20_000
        sent = 0
        started = time.monotonic()
        with trio.move_on_after(60):
            try:
                for _ in range(100):  # two million pings, never reading an answer
                    await stream.send_all(batch)
                    sent += 20_000
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await closed_within(stream, 30)
        assert sent < 2_000_000, "the shard kept reading pings it could not answer"
        growth = (shard.status_kib("VmHWM") - before) / 1024
        print(
            f"sent {sent} pings in {time.monotonic() - started:.1f}s; peak growth {growth:.0f} MiB"
        )
        assert growth < 80, f"RSS grew {growth:.0f} MiB"
        await assert_serves(shard)


async def test_unread_replies_are_dropped(tmp_path: Path) -> None:
    """60 reads of a 2 MiB stream that the caller never reads: dropped within the write
    stall bound (the shard does not hold the answers forever)."""
    with shard_process(tmp_path) as shard:
        writer, decoder, _ = await open_authenticated(shard.address, "shard-0")
        assert (await call(writer, decoder, request(1, "PUT", "big")))["s"] == 201
        item = b'"' + b"x" * (64 * 1024) + b'"'
        body = b"[" + b",".join([item] * 32) + b"]"  # 2 MiB
        assert (await call(writer, decoder, request(2, "POST", "big", body)))["s"] == 204
        await trio.aclose_forcefully(writer)

        before = shard.status_kib("VmRSS")
        reader, _, _ = await open_authenticated(shard.address, "shard-0")
        reads = [dict(request(10 + n, "GET", "big"), q="offset=-1") for n in range(60)]
        await reader.send_all(b"".join(wire.encode(r) for r in reads))
        started = time.monotonic()
        with trio.fail_after(40):
            # not reading: just wait for the shard to give up on us
            while True:
                await trio.sleep(0.5)
                if any("peer reads no replies" in line for line in shard.lines):
                    break
        await trio.sleep(0.5)
        peak, after = shard.status_kib("VmHWM"), shard.status_kib("VmRSS")
        print(
            f"dropped after {time.monotonic() - started:.1f}s; RSS {before // 1024} MiB,"
            f" peak {peak // 1024} MiB, after {after // 1024} MiB"
        )
        await trio.aclose_forcefully(reader)
        await assert_serves(shard)


async def test_half_sent_large_frame_is_dropped(tmp_path: Path) -> None:
    with shard_process(tmp_path) as shard:
        stream, _, _ = await open_authenticated(shard.address, "shard-0")
        before = shard.status_kib("VmRSS")
        await stream.send_all(struct.pack(">I", 200 * MIB) + b"\x00" * (20 * MIB))
        started = time.monotonic()
        await closed_within(stream, 30)
        elapsed = time.monotonic() - started
        assert elapsed < 20, f"a stalled 200 MiB frame was held {elapsed:.1f}s"
        await trio.sleep(0.5)
        after = shard.status_kib("VmRSS")
        print(f"dropped after {elapsed:.1f}s; RSS {before // 1024} -> {after // 1024} MiB")
        assert (after - before) / 1024 < 40
        await assert_serves(shard)


async def test_large_frames_are_decoded_in_any_layout_and_a_bad_one_costs_its_connection(
    tmp_path: Path,
) -> None:
    """A large frame's body is joined off the loop and its head decoded apart; a large
    frame in another layout (no body last: an op's arguments) is decoded whole, and a
    large frame of the wrong shape is refused like any other: its connection closes,
    nothing else."""
    octets = [["content-type", "application/octet-stream"]]
    first, second = os.urandom(6 * MIB + 5), os.urandom(3 * MIB)
    with shard_process(tmp_path) as shard:
        stream, decoder, _ = await open_authenticated(shard.address, "shard-0")
        assert (await call(stream, decoder, dict(request(1, "PUT", "big"), h=octets)))["s"] == 201
        frame = wire.encode(dict(request(2, "POST", "big", first), h=octets))
        for at in range(0, len(frame), 100_000):  # in slices, as a slow link delivers it
            await stream.send_all(frame[at : at + 100_000])
        assert (await receive_frame(stream, decoder))["s"] == 204
        other = {"k": "req", "i": 3, "r": 1, "op": "no_such_op", "a": {"pad": second}}
        answer = await call(stream, decoder, other)
        assert answer["k"] == "err" and answer["code"] == "bad_request", answer
        answer = await call(stream, decoder, dict(request(4, "POST", "big", second), h=octets))
        assert answer["s"] == 204, answer
        got, query, n = b"", "offset=-1", 10
        while len(got) < len(first) + len(second):
            answer = await call(stream, decoder, dict(request(n, "GET", "big"), q=query))
            assert answer["s"] == 200 and answer["b"], answer["s"]
            got += answer["b"]
            query = "offset=" + dict(answer["h"])["stream-next-offset"]
            n += 1
        assert got == first + second

        big = os.urandom(2 * MIB)
        for bad in (
            [wire.REQ_HTTP, [1], 1, "POST", "big", "", octets, b"", big],  # a bad id
            [wire.REQ_OP, 1, 1, 5, {"pad": big}],  # an op that is no string
            [wire.REQ_HTTP, 1, 1, "POST", "big", "", octets, b"", "text" * MIB],  # a text body
            [wire.REQ_HTTP, 1, 1, "POST", "big", "", octets, b"", big, 1],  # an item too many
            [wire.REQ_HTTP, 1, "POST", "big", "", octets, b"", big],  # an item too few
            [wire.REQ_HTTP, 1, 1, "POST", "big", "", octets, b"t" * 65, big],  # a long token
        ):
            hostile, _, _ = await open_authenticated(shard.address, "shard-0")
            packed = msgpack.packb(bad, use_bin_type=True)
            await hostile.send_all(struct.pack(">I", len(packed)) + packed)
            await closed_within(hostile, 10)
        answer = await call(stream, decoder, dict(request(99, "POST", "big", b"tail"), h=octets))
        assert answer["s"] == 204, answer
        await trio.aclose_forcefully(stream)
        await assert_serves(shard)


# ---- a rolling upgrade: builds of different wire versions refuse each other ---------------


def _wait_for_line(lines: list[str], text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, "".join(lines[-30:])
        time.sleep(0.05)


async def test_a_shard_refuses_a_caller_of_the_previous_wire_version(tmp_path: Path) -> None:
    """A caller of the previous build (its hello says wire version 3) is told nothing,
    not even the shard's hello, and the shard's log names both versions."""
    old = wire.WIRE_VERSION - 1
    hello = {"v": old, "k": "hello", "role": "gateway", "id": "old", "nonce": os.urandom(32)}
    packed = msgpack.packb({**hello, "r": 1}, use_bin_type=True)
    with shard_process(tmp_path) as shard:
        stream = await trio.open_tcp_stream(*shard.address)
        await stream.send_all(struct.pack(">I", len(packed)) + packed)
        assert await closed_within(stream, 10) == []
        _wait_for_line(shard.lines, f"wire version {old}, this process speaks {wire.WIRE_VERSION}")
        await assert_serves(shard)


def test_a_gateway_does_not_use_a_shard_of_another_wire_version() -> None:
    """A shard whose hello says another wire version (an older build, mid-upgrade) is
    not used: /readyz says so, and the gateway's log names both versions."""
    fake = FakeShard("s1")
    fake.wire_version = wire.WIRE_VERSION - 1
    shard = ThreadedShard(fake)
    port = shard.start()
    gateway = GatewayProcess(f"s1=127.0.0.1:{port}")
    try:
        wait_problems(gateway, {"s1": "protocol error"})
        expected = f"wire version {fake.wire_version}, this process speaks {wire.WIRE_VERSION}"
        _wait_for_line(gateway.lines, expected)
        assert not fake.requests
    finally:
        gateway.stop()
        shard.stop()


# ---- the ring-version fence ---------------------------------------------------------------


async def test_ring_version_fence(tmp_path: Path) -> None:
    with shard_process(tmp_path) as shard:
        stream, decoder, ready = await open_authenticated(shard.address, "shard-0", ring_version=2)
        assert ready["ring"]["version"] == 1
        answer = await call(stream, decoder, request(1, "PUT", "fenced", r=2))
        assert answer["k"] == "err" and answer["code"] == "version", answer
        ring = answer["a"]["ring"]
        assert (ring["version"], ring["shards"]) == (1, ["shard-0"])
        answer = await call(stream, decoder, request(2, "HEAD", "fenced", r=1))
        assert answer["k"] == "res" and answer["s"] == 404  # it did not run
        await trio.aclose_forcefully(stream)
        # (A gateway on a newer ring brings the shard to it: tests/test_ring_live.py.)


async def version_error(msg: dict[str, Any], reply: Reply) -> None:
    await reply({"k": "err", "i": msg["i"], "code": "version", "msg": "ring v2", "a": {}})


def test_version_error_is_503_with_retry_after() -> None:
    shard = ThreadedShard(FakeShard("s1", version_error))
    port = shard.start()
    gateway = GatewayProcess(f"s1=127.0.0.1:{port}")
    try:
        assert gateway.wait_ready().status_code == 200
        response = httpx.post(f"{gateway.url}/v1/stream/a", content=b"x")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
    finally:
        assert gateway.stop() == 0
        shard.stop()


def test_failed_storage_is_named_by_readyz() -> None:
    fake = FakeShard("s1")
    fake.health = {"storage": "failed: disk I/O error"}
    shard = ThreadedShard(fake)
    port = shard.start()
    gateway = GatewayProcess(f"s1=127.0.0.1:{port}")
    try:
        wait_problems(gateway, {"s1": "storage failed: disk I/O error"})
        fake.health = {"storage": "ok"}  # reported again by the next ping
        assert gateway.wait_ready(timeout=10).status_code == 200
    finally:
        assert gateway.stop() == 0
        shard.stop()


# ---- TLS ----------------------------------------------------------------------------------


async def test_tls_round_trip(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    shard_cert = ca.issue_cert("127.0.0.1", "localhost")
    gateway_cert = ca.issue_cert("gateway.test")
    files = {}
    for name, cert in (("shard", shard_cert), ("gateway", gateway_cert)):
        files[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(str(files[name][0]))
        cert.private_key_pem.write_to_path(str(files[name][1]))

    def tls(name: str) -> list[str]:
        cert, key = files[name]
        return [
            "--rpc-tls-cert",
            str(cert),
            "--rpc-tls-key",
            str(key),
            "--rpc-tls-ca",
            str(ca_file),
        ]

    with shard_process(tmp_path, "shard-0", *tls("shard")) as shard:
        gateway = GatewayProcess(f"shard-0=127.0.0.1:{shard.port}", *tls("gateway"))
        try:
            assert gateway.wait_ready(timeout=10).status_code == 200
            with httpx.Client(base_url=gateway.url, timeout=10) as client:
                url = "/v1/stream/over-tls"
                headers = {"content-type": JSON_TYPE}
                assert client.put(url, headers=headers).status_code == 201
                assert client.post(url, headers=headers, content=b'["x"]').status_code == 204
                assert client.get(url, params={"offset": "-1"}).json() == ["x"]
        finally:
            assert gateway.stop() == 0

        assert shard.alive(), "".join(shard.lines[-40:])
        # Plain TCP to the TLS port gets nothing.
        with pytest.raises((AuthError, trio.BrokenResourceError, wire.WireError)):
            await open_authenticated(shard.address, "shard-0")
        # A gateway without TLS cannot use it, nor one whose certificate the CA did not sign.
        plain = GatewayProcess(f"shard-0=127.0.0.1:{shard.port}")
        try:
            assert plain.wait_ready(expect=503, timeout=5).status_code == 503
        finally:
            assert plain.stop() == 0
        other = trustme.CA().issue_cert("rogue")
        rogue = (tmp_path / "rogue.pem", tmp_path / "rogue.key")
        other.cert_chain_pems[0].write_to_path(str(rogue[0]))
        other.private_key_pem.write_to_path(str(rogue[1]))
        rogue_gateway = GatewayProcess(
            f"shard-0=127.0.0.1:{shard.port}",
            *["--rpc-tls-cert", str(rogue[0]), "--rpc-tls-key", str(rogue[1])],
            *["--rpc-tls-ca", str(ca_file)],
        )
        try:
            ready = rogue_gateway.wait_ready(expect=503, timeout=5)
            assert ready.status_code == 503 and "shard-0" in ready.json()["shards"]
        finally:
            assert rogue_gateway.stop() == 0
        await trio.sleep(0)
        assert shard.alive()


# ---- credentials ---------------------------------------------------------------------------


def _run_to_exit(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "ds_cluster", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env or env_without_secret(),
    )
    return done.returncode, done.stderr


def test_no_secret_or_a_careless_one_refuses_to_start(tmp_path: Path) -> None:
    shard = ["shard", "--id", "s", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")]
    gateway = ["gateway", "--listen", "127.0.0.1:0", "--shards", "s=127.0.0.1:1"]
    loose = write_secret_file(tmp_path)
    loose.chmod(0o644)
    short = tmp_path / "short.secret"
    short.write_bytes(b"too short")
    short.chmod(0o600)
    for role in (shard, gateway):
        code, err = _run_to_exit(role)
        assert code == 2 and "no cluster secret" in err, err
        assert len(err.strip().splitlines()) == 1, err
        code, err = _run_to_exit([*role, "--cluster-secret-file", str(loose)])
        assert code == 2 and "chmod 600" in err, err
        code, err = _run_to_exit([*role, "--cluster-secret-file", str(short)])
        assert code == 2 and "fewer than 32 bytes" in err, err
        env = dict(env_without_secret(), DS_CLUSTER_SECRET="short")
        code, err = _run_to_exit(role, env)
        assert code == 2 and "shorter than 32 bytes" in err, err


async def test_secret_from_the_environment(tmp_path: Path) -> None:
    env = dict(env_without_secret(), DS_CLUSTER_SECRET=TEST_SECRET.decode())
    shard = ShardProcess(tmp_path, "shard-0", env=env)
    try:
        await assert_serves(shard)
        with pytest.raises(AuthError):
            await open_authenticated(shard.address, "shard-0", secret=WRONG_SECRET)
    finally:
        shard.stop()
    path = write_secret_file(tmp_path)
    env = dict(env_without_secret(), DS_CLUSTER_SECRET_FILE=str(path))
    shard = ShardProcess(tmp_path, "shard-1", env=env)
    try:
        await assert_serves(shard)
    finally:
        shard.stop()


def test_up_makes_a_private_secret(tmp_path: Path) -> None:
    path = ensure_secret_file(tmp_path / SECRET_FILE_NAME)
    assert path.stat().st_mode & 0o777 == 0o600
    secret = read_secret_file(path)
    assert len(secret) == 64 and bytes.fromhex(secret.decode())
    assert ensure_secret_file(path) == path and read_secret_file(path) == secret  # kept


def test_tls_and_secret_options_from_the_environment(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    parser = argparse.ArgumentParser()
    rpc_security.add_arguments(parser)
    args = parser.parse_args([])
    env = {
        "DS_CLUSTER_SECRET_FILE": str(write_secret_file(tmp_path)),
        "DS_RPC_TLS_CERT": str(paths["cert"]),
        "DS_RPC_TLS_KEY": str(paths["key"]),
        "DS_RPC_TLS_CA": str(paths["ca"]),
    }
    security = rpc_security.from_args(args, server=True, environ=env)
    assert security.secret == TEST_SECRET
    assert security.server_ssl is not None and security.client_ssl is not None
    gateway = rpc_security.from_args(args, server=False, environ=env)
    assert gateway.server_ssl is None and gateway.client_ssl is not None
    with pytest.raises(rpc_security.SecurityError, match="go together"):
        rpc_security.from_args(args, server=False, environ=dict(env, DS_RPC_TLS_KEY=""))
    with pytest.raises(rpc_security.SecurityError, match="needs --rpc-tls-cert"):
        only_ca = {"DS_CLUSTER_SECRET": TEST_SECRET.decode(), "DS_RPC_TLS_CA": env["DS_RPC_TLS_CA"]}
        rpc_security.from_args(args, server=True, environ=only_ca)


async def test_up_refuses_a_secret_others_can_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    secret = data / SECRET_FILE_NAME
    secret.write_text("s" * 64)
    secret.chmod(0o644)
    config = ClusterConfig(shards=1, gateways=1, port=0, data_dir=data, log_dir=tmp_path / "logs")
    with pytest.raises(SupervisorError, match="chmod 600"):
        await Supervisor(config).run()
