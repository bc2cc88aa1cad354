"""common/rpc_core.py (the RPC's sans-IO state machines and frames), common/ring.py's ring
as wire data, and common/rpc_transport.py's writer over an in-memory stream: no sockets."""

from __future__ import annotations

import contextlib
import socket

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from support.auth import TEST_SECRET

from ds_cluster.common import rpc_core, wire
from ds_cluster.common.cluster_auth import AuthError, ClientHandshake, ServerHandshake
from ds_cluster.common.ring import Ring, RingHolder
from ds_cluster.common.rpc_transport import FrameWriter, WriteBudget

RING = Ring(3, ("shard-0", "shard-1"), {"shard-0": ("127.0.0.1", 7001), "shard-1": ("::1", 7002)})


def roundtrip(frame: object) -> wire.Frame:
    """A frame as the peer receives it: encoded, decoded and checked."""
    [decoded] = wire.FrameDecoder().feed(wire.encode(frame))  # type: ignore[arg-type]
    return decoded


def connected_pair() -> tuple[
    rpc_core.CallerProtocol[rpc_core.CallState], rpc_core.ShardProtocol[str]
]:
    """Both ends of one connection, through the whole handshake."""
    caller: rpc_core.CallerProtocol[rpc_core.CallState] = rpc_core.CallerProtocol(
        ClientHandshake(
            TEST_SECRET, role="gateway", name="g", shard_id="shard-0", ring=RING.to_wire()
        )
    )
    shard: rpc_core.ShardProtocol[str] = rpc_core.ShardProtocol(
        ServerHandshake(TEST_SECRET, shard_id="shard-0", ring=RING.to_wire()), max_calls=3
    )
    frame: object = caller.hello()
    while not caller.ready:
        reply = shard.on_handshake(roundtrip(frame), {"storage": "ok"})
        frame = caller.on_handshake(roundtrip(reply))
        if frame is None:
            break
    assert caller.ready and shard.authenticated
    assert caller.peer_ring is not None and Ring.from_wire(caller.peer_ring) == RING
    assert caller.health == {"storage": "ok"}
    return caller, shard


def http_fields(path: str = "a") -> wire.RequestFields:
    return {"m": "GET", "p": path, "q": "", "h": [], "b": b""}


def test_handshake_then_requests_only_when_ready() -> None:
    caller: rpc_core.CallerProtocol[rpc_core.CallState] = rpc_core.CallerProtocol(
        ClientHandshake(
            TEST_SECRET, role="gateway", name="g", shard_id="shard-0", ring=RING.to_wire()
        )
    )
    with pytest.raises(AuthError):
        caller.request("http", http_fields(), rpc_core.CallState(), 1)
    connected_pair()


def test_a_shard_without_the_secret_is_refused_before_any_request() -> None:
    caller: rpc_core.CallerProtocol[rpc_core.CallState] = rpc_core.CallerProtocol(
        ClientHandshake(
            TEST_SECRET, role="gateway", name="g", shard_id="shard-0", ring=RING.to_wire()
        )
    )
    impostor: rpc_core.ShardProtocol[str] = rpc_core.ShardProtocol(
        ServerHandshake(b"x" * 40, shard_id="shard-0", ring=RING.to_wire())
    )
    reply = impostor.on_handshake(roundtrip(caller.hello()), {})
    with pytest.raises(AuthError):
        caller.on_handshake(roundtrip(reply))
    assert not caller.ready


def test_request_lifecycle_streamed_and_whole() -> None:
    caller, shard = connected_pair()
    streamed, whole, failed = rpc_core.CallState(), rpc_core.CallState(), rpc_core.CallState()
    requests = [
        roundtrip(caller.request("http", http_fields(), call, RING.version))
        for call in (streamed, whole, failed)
    ]
    assert [r["i"] for r in requests] == [1, 2, 3]
    for request in requests:
        assert request["k"] == "req" and request["r"] == 3
        assert shard.admit(request, RING) is None
        shard.started(request["i"], f"task-{request['i']}")

    def receive(frame: object) -> rpc_core.CallState | None:
        return caller.on_frame(roundtrip(frame))

    assert receive(rpc_core.response(1, 200, [("content-type", "x")], b"head", True)) is streamed
    assert receive(rpc_core.chunk(1, b"more", True)) is streamed
    assert receive(rpc_core.response(2, 204, [], b"", False)) is whole
    assert receive(rpc_core.error(3, "moving", "later", {"retry_after": 0.2})) is failed
    assert set(caller.pending) == {1}
    assert receive(rpc_core.chunk(1, b"", False)) is streamed
    assert caller.pending == {}
    assert receive(rpc_core.chunk(1, b"late", True)) is None  # a stray: ignored
    for call_id in (1, 2, 3):
        shard.finished(call_id)
    assert shard.calls == {}


@pytest.mark.parametrize(
    "frames",
    [
        [rpc_core.chunk(1, b"x", True)],  # a chunk before its response
        [rpc_core.response(1, 200, [], b"", True), rpc_core.response(1, 200, [], b"", False)],
        [rpc_core.cancel(1)],  # a kind only callers send
        [rpc_core.request(1, "http", 1, http_fields())],
    ],
)
def test_a_shard_that_breaks_the_lifecycle_is_a_protocol_error(frames: list[object]) -> None:
    caller, _ = connected_pair()
    caller.request("http", http_fields(), rpc_core.CallState(), 3)
    with pytest.raises(rpc_core.ProtocolError):
        for frame in frames:
            caller.on_frame(roundtrip(frame))


def test_abandon_and_lost() -> None:
    caller, _ = connected_pair()
    first, second = rpc_core.CallState(), rpc_core.CallState()
    caller.request("http", http_fields(), first, 3)
    caller.request("http", http_fields(), second, 3)
    assert caller.abandon(first) is True
    assert caller.abandon(first) is False  # once
    assert caller.on_frame(roundtrip(rpc_core.response(first.id, 200, [], b"", False))) is None
    assert caller.lost() == [second]
    assert not caller.ready and caller.pending == {}


def test_shard_fences_other_rings_but_not_ring_ops_and_bounds_calls() -> None:
    _, shard = connected_pair()
    older = roundtrip(rpc_core.request(1, "http", 2, http_fields()))
    refusal = shard.admit(older, RING)
    assert refusal is not None and refusal["code"] == "version"
    assert Ring.from_wire(refusal.get("a", {})["ring"]) == RING
    for op in ("ping", "ring_get", "ring_set", "move_status", "move_stream"):
        assert wire.ring_free(op)
        frame = roundtrip(rpc_core.request(2, op, 99, {"a": {}}))
        assert shard.admit(frame, RING) is None, op
    for call_id in (10, 11, 12):
        shard.started(call_id, "task")
    with pytest.raises(rpc_core.ProtocolError):
        shard.admit(roundtrip(rpc_core.request(10, "http", 3, http_fields())), RING)
    crowded = shard.admit(roundtrip(rpc_core.request(13, "http", 3, http_fields())), RING)
    assert crowded is not None and crowded["code"] == "unavailable"
    assert shard.on_cancel(roundtrip(rpc_core.cancel(11))) == "task"  # type: ignore[arg-type]
    shard.finished(11)
    assert shard.on_cancel(roundtrip(rpc_core.cancel(11))) is None  # type: ignore[arg-type]


def test_constructed_frames_pass_the_schema_and_keep_their_fields() -> None:
    frames: list[object] = [
        rpc_core.response(5, 201, [["location", "/x"]], b"body", False),
        rpc_core.result(6, {"ok": True}),
        rpc_core.chunk(7, b"data", True),
        rpc_core.cancel(8),
        rpc_core.error(9, "bad_request", "no"),
        rpc_core.ring_error(10, "misdirected", "not mine", RING),
    ]
    for frame in frames:
        decoded = roundtrip(frame)
        assert all(decoded[k] == v for k, v in frame.items()), frame  # type: ignore[attr-defined,literal-required]
    assert roundtrip(rpc_core.result(6, {}))["more"] is False  # left out, filled in


def test_op_arguments_are_checked_by_table() -> None:
    wire.check_args("ring_set", {"ring": RING.to_wire()})  # type: ignore[dict-item]
    wire.check_args("export_fork", {"anything": 1})  # no schema: the handler checks
    for bad in ({}, {"ring": "v2"}):
        with pytest.raises(wire.BadArguments):
            wire.check_args("ring_set", bad)


# ---- the ring as data --------------------------------------------------------------------


def test_ring_wire_roundtrip_and_placement() -> None:
    info = RING.to_wire()
    assert info == {
        "version": 3,
        "shards": ["shard-0", "shard-1"],
        "endpoints": {"shard-0": "127.0.0.1:7001", "shard-1": "[::1]:7002"},
    }
    again = Ring.from_wire(roundtrip(rpc_core.result(1, {"ring": info}))["a"]["ring"])  # type: ignore[typeddict-item]
    assert again == RING and again.endpoints == RING.endpoints
    assert all(again.owner(f"p{n}") == RING.owner(f"p{n}") for n in range(200))
    bare = Ring(3, ("shard-1", "shard-0"))  # endpoints are optional; ids are sorted
    assert bare.shard_ids == RING.shard_ids and Ring.from_wire(bare.to_wire()) == bare


@pytest.mark.parametrize(
    "info",
    [
        None,
        [],
        {"version": 1},
        {"version": "1", "shards": ["a"]},
        {"version": -1, "shards": ["a"]},
        {"version": 1, "shards": []},
        {"version": 1, "shards": ["a", "a"]},
        {"version": 1, "shards": [1]},
        {"version": 1, "shards": ["a"], "endpoints": {"b": "h:1"}},  # not in the ring
        {"version": 1, "shards": ["a"], "endpoints": {"a": "h"}},
        {"version": 1, "shards": ["a"], "endpoints": {"a": ":1"}},
        {"version": 1, "shards": ["a"], "endpoints": {"a": "h:99999"}},
        {"version": 1, "shards": ["a"], "endpoints": ["a"]},
    ],
)
def test_malformed_rings_are_refused(info: object) -> None:
    with pytest.raises(ValueError):
        Ring.from_wire(info)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["version", "shards", "endpoints", "x"]), _VALUES))
def test_from_wire_gives_a_ring_or_value_error_only(info: dict[str, object]) -> None:
    with contextlib.suppress(ValueError):
        ring = Ring.from_wire(info)
        assert Ring.from_wire(ring.to_wire()) == ring


async def test_ring_holder_only_moves_forward_and_wakes_waiters() -> None:
    holder = RingHolder(Ring(1, ("a",)))
    woke: list[int] = []

    async def waiter() -> None:
        woke.append((await holder.wait_newer(1)).version)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not holder.adopt(Ring(1, ("a", "b")))  # not newer
        assert not holder.adopt(Ring(0, ("b",)))
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        assert holder.adopt(Ring(2, ("a", "b")))
    assert woke == [2] and holder.version == 2
    assert (await holder.wait_newer(1)).version == 2  # at once when already newer


# ---- the writer, over an in-memory stream ------------------------------------------------


async def test_writer_coalesces_marks_sent_discards_and_bounds() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        writer = FrameWriter(
            ours, nursery.cancel_scope, budget=64 * 1024, shared=WriteBudget(10**9)
        )
        calls = [rpc_core.CallState() for _ in range(3)]
        frames = [rpc_core.chunk(n, b"x" * 10, True) for n in range(3)]
        for call, frame in zip(calls, frames, strict=True):
            assert writer.try_queue(wire.encode_parts(frame), call)
        writer.discard(calls[1])  # given up before it went: never sent
        # Over the budget while something is held: refused (the caller fails fast).
        assert not writer.try_queue([b"y" * 70_000])
        nursery.start_soon(writer.run)
        decoder = wire.FrameDecoder()
        received: list[wire.Frame] = []
        with trio.fail_after(5):
            while len(received) < 2:
                received += decoder.feed(await theirs.receive_some(1 << 20))
        assert [f["i"] for f in received] == [0, 2]  # type: ignore[typeddict-item]
        assert calls[0].sent and calls[2].sent and not calls[1].sent
        # Nothing held now: one large frame always goes.
        assert writer.try_queue(wire.encode_parts(rpc_core.chunk(9, b"z" * 100_000, False)))
        with trio.fail_after(5):
            while len(received) < 3:
                received += decoder.feed(await theirs.receive_some(1 << 20))
        # An answer that cannot wait, over the budget: the connection is dropped.
        writer.send_nowait(rpc_core.chunk(10, b"w" * 10, True))
        writer.send_nowait(rpc_core.chunk(11, b"w" * 100_000, True))
        assert writer.overflowed
    assert nursery.cancel_scope.cancel_called


async def test_writer_flushes_a_batchs_frames_in_one_write_when_the_batch_ends() -> None:
    """Over a socket, the frames queued in one scheduler batch reach the peer together
    when the batch ends, without the writer task; what a full socket does not take the
    task writes. Once the writer has stopped, nothing is written to its fd."""
    a, b = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    decoder = wire.FrameDecoder()

    def peek() -> list[wire.Frame]:  # what the peer can read now, without waiting
        try:
            return decoder.feed(b.recv(1 << 22, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return []

    async with trio.open_nursery() as nursery:
        writer = FrameWriter(ours, nursery.cancel_scope, budget=1 << 30)  # no task yet
        calls = [rpc_core.CallState() for _ in range(3)]
        for n, call in enumerate(calls):
            assert writer.try_queue(wire.encode_parts(rpc_core.chunk(n, b"x", True)), call)
        assert peek() == [] and not any(call.sent for call in calls)  # the batch goes on
        await trio.sleep(0)  # the batch ends
        assert [f["i"] for f in peek()] == [0, 1, 2]  # type: ignore[typeddict-item]
        assert all(call.sent for call in calls)
        await writer.send(rpc_core.chunk(3, b"y", True))
        await trio.sleep(0)
        assert [f["i"] for f in peek()] == [3]  # type: ignore[typeddict-item]
        # A burst too large to join here (or more than the socket takes): the task's.
        big = [rpc_core.chunk(n, bytes(10_000), True) for n in range(4, 1004)]
        for frame in big:
            writer.send_nowait(frame)
        await trio.sleep(0)
        received = peek()
        assert len(received) < len(big)
        nursery.start_soon(writer.run)
        with trio.fail_after(5):
            while len(received) < len(big):
                await trio.sleep(0.001)
                received += peek()
        assert [f["i"] for f in received] == list(range(4, 1004))  # type: ignore[typeddict-item]
        nursery.cancel_scope.cancel()
    await trio.sleep(0)
    writer.send_nowait(rpc_core.chunk(5, b"w", True))  # the writer is over: queued, unsent
    await trio.sleep(0)
    assert peek() == []
    a.close()
    b.close()


def _medium_frames() -> tuple[bytes, list[bytes]]:
    """Frames of 16 KiB to 1 MiB (body behind the map, or in another layout, or behind a
    head larger than the first look), between small ones: their bytes and bodies."""
    bodies = [bytes([n]) * size for n, size in enumerate((20_000, 200_000, 900_000, 70_000))]
    cancel = wire.encode({"k": "cancel", "i": 9})
    data = [cancel]
    for n, body in enumerate(bodies[:3]):
        data += [wire.encode(rpc_core.chunk(n, body, True)), cancel]
    # a long head: a response whose headers take more than the head's first look
    headers = [["x-long", "v" * 6000]]
    data += [wire.encode(rpc_core.response(3, 200, headers, bodies[3], False)), cancel]
    # the same kind of frame with its body first: decoded whole
    other = {"v": wire.WIRE_VERSION, "k": "chunk", "i": 4, "more": False, "b": bodies[0]}
    packed = msgpack.packb(dict(reversed(list(other.items()))), use_bin_type=True)
    data += [len(packed).to_bytes(4, "big") + packed, cancel]
    return b"".join(data), [*bodies, bodies[0]]


@pytest.mark.parametrize("step", [1, 1000, 16_383, 65_536, 256 * 1024 + 3, 10**7])
def test_frames_spanning_reads_decode_the_same_in_any_pieces(step: int) -> None:
    data, bodies = _medium_frames()
    whole = wire.FrameDecoder().feed(data)
    for feed in ("feed", "feed_deferred"):
        decoder = wire.FrameDecoder()
        frames: list[object] = []
        for at in range(0, len(data), step):
            frames += getattr(decoder, feed)(data[at : at + step])
        assert decoder.partial == 0
        assert frames == whole
    kinds = ["cancel"] + ["chunk", "cancel"] * 3 + ["res", "cancel", "chunk", "cancel"]
    assert [f["k"] for f in whole] == kinds
    assert [f["b"] for f in whole if f["k"] != "cancel"] == bodies  # type: ignore[typeddict-item]
