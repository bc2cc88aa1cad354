"""common/rpc_core.py (the RPC's sans-IO state machines and frames), common/ring.py's ring
as wire data, and common/rpc_transport.py's writer over an in-memory stream: no sockets."""

from __future__ import annotations

import contextlib
import socket
import ssl

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from support.auth import TEST_SECRET

from ds_cluster.common import rpc_core, tcp, wire
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
    assert refusal is not None
    answer = roundtrip(refusal)
    assert answer["k"] == "err" and answer["i"] == 1 and answer["code"] == "version"
    assert Ring.from_wire(answer.get("a", {})["ring"]) == RING
    for op in ("ping", "ring_get", "ring_set", "move_status", "move_stream"):
        assert wire.ring_free(op)
        frame = roundtrip(rpc_core.request(2, op, 99, {"a": {}}))
        assert shard.admit(frame, RING) is None, op
    for call_id in (10, 11, 12):
        shard.started(call_id, "task")
    with pytest.raises(rpc_core.ProtocolError):
        shard.admit(roundtrip(rpc_core.request(10, "http", 3, http_fields())), RING)
    crowded = shard.admit(roundtrip(rpc_core.request(13, "http", 3, http_fields())), RING)
    assert crowded is not None and roundtrip(crowded)["code"] == "unavailable"  # type: ignore[typeddict-item]
    assert shard.on_cancel(roundtrip(rpc_core.cancel(11))) == "task"  # type: ignore[arg-type]
    shard.finished(11)
    assert shard.on_cancel(roundtrip(rpc_core.cancel(11))) is None  # type: ignore[arg-type]


def test_constructed_frames_pass_the_schema_and_keep_their_fields() -> None:
    fields = {"m": "POST", "p": "a/b", "q": "x=1", "h": [["content-type", "t"]], "b": b"[1]"}
    token = b"t" * 56
    frames: list[tuple[wire.Outgoing, dict[str, object]]] = [
        (
            rpc_core.request(4, "http", 3, fields),  # type: ignore[arg-type]
            {"k": "req", "i": 4, "op": "http", "r": 3, "t": b"", **fields},
        ),
        (
            rpc_core.request(4, "http", 3, {**fields, "t": token}),  # type: ignore[typeddict-item]
            {"k": "req", "i": 4, "op": "http", "r": 3, **fields, "t": token},
        ),
        (
            rpc_core.request(5, "ring_get", 3, {"a": {"x": 1}}),
            {"k": "req", "i": 5, "op": "ring_get", "r": 3, "a": {"x": 1}},
        ),
        (
            rpc_core.response(5, 201, (("location", "/x"),), b"body", False),
            {"k": "res", "i": 5, "s": 201, "h": [["location", "/x"]], "b": b"body", "more": False}
            | {"t": b"", "hit": False},
        ),
        (
            rpc_core.response(5, 200, (), b"body", False, token),
            {"k": "res", "i": 5, "s": 200, "h": [], "b": b"body", "more": False}
            | {"t": token, "hit": False},
        ),
        (
            rpc_core.response(5, 200, (), b"", False, token, True),
            {"k": "res", "i": 5, "s": 200, "h": [], "b": b"", "more": False}
            | {"t": token, "hit": True},
        ),
        (
            rpc_core.result(6, {"ok": True}),
            {"k": "res", "i": 6, "s": 200, "h": [], "b": b"", "more": False, "a": {"ok": True}}
            | {"t": b"", "hit": False},
        ),
        (rpc_core.chunk(7, b"data", True), {"k": "chunk", "i": 7, "b": b"data", "more": True}),
        (rpc_core.cancel(8), {"k": "cancel", "i": 8}),
        (
            rpc_core.error(9, "bad_request", "no"),
            {"k": "err", "i": 9, "code": "bad_request", "msg": "no"},
        ),
        (
            rpc_core.ring_error(10, "misdirected", "not mine", RING),
            {"k": "err", "i": 10, "code": "misdirected", "msg": "not mine"}
            | {"a": {"ring": RING.to_wire()}},
        ),
    ]
    for frame, expected in frames:
        assert roundtrip(frame) == expected, frame
        # a dict of the same fields is encoded into the same frame
        assert wire.encode(expected) == wire.encode(frame), expected


# Positional frames of the wrong shape: each a WireError, whatever is wrong.
_BAD_POSITIONAL = [
    [],  # no kind
    [9, 1],  # an unknown kind tag
    [-1, 1],
    [True, 1],  # a bool is not a kind tag
    ["req", 1],
    [wire.CANCEL],  # too few items
    [wire.CANCEL, 1, 2],  # one too many
    [wire.CANCEL, -1],  # an id out of range
    [wire.CANCEL, 2**63],
    [wire.CANCEL, True],
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", []],  # no body
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [], b"", b"", None],  # an extra item
    [wire.REQ_HTTP, 1, "1", "GET", "a", "", [], b"", b""],  # a ring version that is a string
    [wire.REQ_HTTP, 1, 1, b"GET", "a", "", [], b"", b""],
    [wire.REQ_HTTP, 1, 1, "GET", None, "", [], b"", b""],
    [wire.REQ_HTTP, 1, 1, "GET", "a", 5, [], b"", b""],
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [], b"", "text"],  # a body that is not bytes
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", {"a": "b"}, b"", b""],  # headers not a list
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [["a"]], b"", b""],  # a header that is no pair
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [["a", 1]], b"", b""],
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [("a", "b", "c")], b"", b""],
    [wire.REQ_OP, 1, 1, "http", {}],  # http has its own layout
    [wire.REQ_OP, 1, 1, "ping", None],
    [wire.REQ_OP, 1, 1, "ping"],
    [wire.REQ_OP, 1, 1, 5, {}],
    [wire.RES_HTTP, 1, 99, False, [], b"", False, b""],  # a status out of range
    [wire.RES_HTTP, 1, 600, False, [], b"", False, b""],
    [wire.RES_HTTP, 1, 200, 0, [], b"", False, b""],  # more not a bool
    [wire.RES_HTTP, 1, 200, False, [["x", "a\r\nset-cookie: y"]], b"", False, b""],  # CR, LF
    [wire.RES_HTTP, 1, 200, False, [["x", "a\nb"]], b"", False, b""],
    [wire.RES_HTTP, 1, 200, False, [["x", "a\0"]], b"", False, b""],
    [wire.RES_HTTP, 1, 200, False, {"x": "a"}, b"", False, b""],  # headers not a list
    [wire.RES_HTTP, 1, 200, False, [["x"]], b"", False, b""],  # a header that is no pair
    [wire.RES_HTTP, 1, 200, False, [["x", 1]], b"", False, b""],
    [wire.RES_HTTP, 1, 200, False, [[b"x", "a"]], b"", False, b""],
    [wire.RES_HTTP, 1, 200, False, [], b"", False, b"", b""],
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [], None, b""],  # a token that is not bytes
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [], "t", b""],
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [], b"t" * 65, b""],  # a token too long
    [wire.RES_HTTP, 1, 200, False, [], None, False, b""],  # a token that is not bytes
    [wire.RES_HTTP, 1, 200, False, [], b"t" * 65, False, b""],  # a token too long
    [wire.RES_HTTP, 1, 200, False, [], b"t", 0, b""],  # hit not a bool
    [wire.RES_HTTP, 1, 200, False, [], b"t", None, b""],
    [wire.RES_HTTP, 1, 200, False, [], b"", True, b""],  # a hit that names no token
    [wire.RES_HTTP, 1, 200, False, [], b"t", True, b"x"],  # a hit that carries a body
    [wire.RES_HTTP, 1, 200, True, [], b"t", True, b""],  # a hit that streams
    [wire.RES_HTTP, 1, 200, False, [], b"x"],  # the layout of wire version 4
    [wire.REQ_HTTP, 1, 1, "GET", "a", "", [], b""],  # (the same request's)
    [wire.RES_OP, 1, []],
    [wire.RES_OP, 1],
    [wire.CHUNK, 1, True],
    [wire.CHUNK, 1, b"x", True],  # items swapped
    [wire.CHUNK, 1, None, b"x"],
    [wire.ERR, 1, "internal", "x"],  # `a` is not optional in the array: nil
    [wire.ERR, 1, None, "x", None],
    [wire.ERR, 1, "internal", b"x", None],
    [wire.ERR, 1, "internal", "x", []],
    [wire.ERR, 1, "internal", "x", None, None],
    [wire.REQ_APPEND, "a", "t", 1, 1],  # an item too few
    [wire.REQ_APPEND, "a", "t", 1, 1, b"x", b""],  # an item too many
    [wire.REQ_APPEND, b"a", "t", 1, 1, b"x"],  # a path that is not a string
    [wire.REQ_APPEND, "a", None, 1, 1, b"x"],  # a content type that is not a string
    [wire.REQ_APPEND, "a", "t", -1, 1, b"x"],  # an id out of range
    [wire.REQ_APPEND, "a", "t", 2**63, 1, b"x"],
    [wire.REQ_APPEND, "a", "t", 1, "1", b"x"],  # a ring version that is a string
    [wire.REQ_APPEND, "a", "t", 1, 1, "x"],  # a body that is not bytes
    [wire.REQ_APPEND, 1, 1, "a", "t", b"x"],  # the general request's order
    [wire.RES_DONE, 1],  # an item too few
    [wire.RES_DONE, 1, "o", b""],  # an item too many
    [wire.RES_DONE, -1, "o"],
    [wire.RES_DONE, 1, 5],  # an offset that is not a string
    [wire.RES_DONE, 1, "o\r\nset-cookie: y"],  # a header value's CR, LF or NUL
    [wire.RES_DONE, 1, "o\0"],
]


@pytest.mark.parametrize("frame", _BAD_POSITIONAL, ids=repr)
def test_positional_frames_of_the_wrong_shape_are_refused(frame: list[object]) -> None:
    packed = msgpack.packb(frame, use_bin_type=True)
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(len(packed).to_bytes(4, "big") + packed)


def test_hot_kinds_are_refused_as_maps_and_the_handshake_as_arrays() -> None:
    """After the handshake only arrays pass (a map of a hot kind is an older peer's), and
    the handshake's kinds are maps with the wire version."""
    for frame in (
        {"v": wire.WIRE_VERSION, "k": "cancel", "i": 1},
        {"v": wire.WIRE_VERSION, "k": "req", "i": 1, "r": 1, "op": "ping", "a": {}},
        {"v": 3, "k": "hello", "role": "gateway", "id": "g", "nonce": b"n" * 32, "r": 1},
        ["hello", "gateway"],
    ):
        packed = msgpack.packb(frame, use_bin_type=True)
        with pytest.raises(wire.WireError):
            wire.FrameDecoder().feed(len(packed).to_bytes(4, "big") + packed)


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
        assert woke == [] and holder.current == Ring(1, ("a",)) and holder.version == 1
        assert holder.adopt(Ring(2, ("a", "b")))
    assert woke == [2] and holder.version == 2 and holder.current == Ring(2, ("a", "b"))
    assert (await holder.wait_newer(1)).version == 2  # at once when already newer


# ---- the writer, over an in-memory stream ------------------------------------------------


async def _read_frames(
    stream: trio.abc.ReceiveStream,
    decoder: wire.FrameDecoder,
    received: list[wire.Frame],
    count: int,
) -> None:
    """Decode what `stream` brings into `received` until it holds `count` frames."""
    with trio.fail_after(5):
        while len(received) < count:
            received += decoder.feed(await stream.receive_some(1 << 20))


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
        await _read_frames(theirs, decoder, received, 2)
        assert [f["i"] for f in received] == [0, 2]  # type: ignore[typeddict-item]
        assert calls[0].sent and calls[2].sent and not calls[1].sent
        # Nothing held now: one large frame always goes.
        assert writer.try_queue(wire.encode_parts(rpc_core.chunk(9, b"z" * 100_000, False)))
        await _read_frames(theirs, decoder, received, 3)
        # An answer that cannot wait, over the budget: the connection is dropped.
        writer.send_nowait(rpc_core.chunk(10, b"w" * 10, True))
        writer.send_nowait(rpc_core.chunk(11, b"w" * 100_000, True))
        assert writer.overflowed
    assert nursery.cancel_scope.cancel_called


@pytest.mark.parametrize("tls", [False, True])
async def test_writer_lets_the_kernel_hold_a_large_frame(tls: bool) -> None:
    """A link's socket, plain or under TLS, takes writes while under
    `common.tcp.UNSENT_LIMIT` bytes are unsent (trio sets 16 KiB): a catch-up body or a
    fork's export in one write."""
    option = (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with trio.socket.socket() as client:
            await client.connect(listener.getsockname())
            accepted, _ = await listener.accept()
            tcp_stream = trio.SocketStream(accepted)
            assert tcp_stream.socket.getsockopt(*option) == 16 * 1024  # trio's own
            ours: trio.abc.Stream = tcp_stream
            if tls:  # (no handshake: the writer only looks at the socket underneath)
                ours = trio.SSLStream(tcp_stream, ssl.create_default_context())
            async with trio.open_nursery() as nursery:
                FrameWriter(ours, nursery.cancel_scope, budget=1 << 20)
                assert tcp_stream.socket.getsockopt(*option) == tcp.UNSENT_LIMIT
            await tcp_stream.aclose()


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
    """Frames of 16 KiB to 1 MiB (body behind the head, or in another layout, or behind a
    head larger than the first look), between small ones: their bytes and bodies."""
    bodies = [bytes([n]) * size for n, size in enumerate((20_000, 200_000, 900_000, 70_000))]
    cancel = wire.encode({"k": "cancel", "i": 9})
    data = [cancel]
    for n, body in enumerate(bodies[:3]):
        data += [wire.encode(rpc_core.chunk(n, body, True)), cancel]
    # a long head: a response whose headers take more than the head's first look
    headers = [["x-long", "v" * 6000]]
    data += [wire.encode(rpc_core.response(3, 200, headers, bodies[3], False)), cancel]
    # a large frame whose last item is not its body (an op's result): decoded whole
    data += [wire.encode(rpc_core.result(4, {"b": bodies[0], "n": 1})), cancel]
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
    kinds = ["cancel"] + ["chunk", "cancel"] * 3 + ["res", "cancel", "res", "cancel"]
    assert [f["k"] for f in whole] == kinds
    got = [f["b"] or f["a"]["b"] for f in whole if f["k"] != "cancel"]  # type: ignore[typeddict-item]
    assert got == bodies


@given(
    call_id=st.one_of(
        st.integers(0, 300),
        st.integers(0, wire.MAX_CALL_ID),
        st.sampled_from([0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 2**32 - 1, 2**32]),
    ),
    value=st.one_of(
        st.text(min_size=33, max_size=33),
        st.text(alphabet="0123456789_", min_size=31, max_size=35),
    ),
    status=st.sampled_from([204, 200]),
    name=st.sampled_from(["stream-next-offset", "etag"]),
)
def test_an_appends_answer_is_packed_as_the_packer_packs_it(
    call_id: int, value: str, status: int, name: str
) -> None:
    """`encode_response`'s template for an append's 204 gives the Packer's very bytes of
    its `done` frame, which decodes as the general answer does; any other answer (another
    status, header, offset length, non-ASCII) takes the Packer's general `res`."""
    headers = ((name, value),)
    general = msgpack.packb(
        [wire.RES_HTTP, call_id, status, False, headers, b"", False, b""], use_bin_type=True
    )
    done = status == 204 and name == "stream-next-offset" and len(value) == 33 and value.isascii()
    packed = msgpack.packb([wire.RES_DONE, call_id, value]) if done else general
    expected = [len(packed).to_bytes(4, "big") + packed]
    assert wire.encode_response(call_id, status, headers, b"") == expected
    assert wire.encode_response(call_id, status, [list(headers[0])], b"") == expected
    if not any(c in value for c in "\r\n\0"):
        framed = len(general).to_bytes(4, "big") + general
        assert wire.FrameDecoder().feed(expected[0]) == wire.FrameDecoder().feed(framed)
    else:
        with pytest.raises(wire.WireError):
            wire.FrameDecoder().feed(expected[0])


async def test_writer_queues_a_groups_frames_in_one_step_within_its_budgets() -> None:
    """`send_frames_nowait` queues whole frames together, in order after what is queued;
    over the budgets it queues them one by one, as `send_parts_nowait` would: the first
    goes while nothing is held, and a frame over the budget drops the connection."""
    ours, theirs = trio.testing.memory_stream_pair()
    shared = WriteBudget(10**9)
    async with trio.open_nursery() as nursery:
        writer = FrameWriter(ours, nursery.cancel_scope, budget=64 * 1024, shared=shared)
        writer.send_parts_nowait(wire.encode_response(1, 204, (), b""))
        group = [wire.encode_response(n, 200, (), b"x" * 10)[0] for n in range(2, 6)]
        writer.send_frames_nowait(group)
        nursery.start_soon(writer.run)
        received: list[wire.Frame] = []
        await _read_frames(theirs, wire.FrameDecoder(), received, 5)
        assert [f["i"] for f in received] == [1, 2, 3, 4, 5]  # type: ignore[typeddict-item]
        with trio.fail_after(5):
            while shared.used:
                await trio.sleep(0.001)
        # A group over the budget: queued one by one until one is over it, which drops
        # the connection.
        large = [wire.encode_response(n, 200, (), b"y" * 15_000)[0] for n in range(6, 11)]
        writer.send_frames_nowait(large)
        assert writer.overflowed
    assert nursery.cancel_scope.cancel_called


def test_request_items_of_any_fields() -> None:
    """An http request's items are the same from all five fields of a forwarded request
    (read directly) as from any other mapping (read with their defaults)."""
    full = {"m": "POST", "p": "a/b", "q": "x=1", "h": (("content-type", "t"),), "b": b"x"}
    items = wire.request_items(7, "http", 3, full)
    assert items == [wire.REQ_HTTP, 7, 3, "POST", "a/b", "x=1", (("content-type", "t"),), b"", b"x"]
    with_token = {**full, "t": b"tok"}
    assert wire.request_items(7, "http", 3, with_token)[7] == b"tok"
    five_other = {"m": "GET", "p": "a", "q": "", "h": [], "t": b"tok"}  # no body, a token
    assert wire.request_items(1, "http", 1, five_other)[7:] == [b"tok", b""]
    five_odd = {"m": "GET", "p": "a", "q": "", "h": [], "x": 1}
    assert wire.request_items(1, "http", 1, five_odd)[7:] == [b"", b""]
    assert wire.request_items(1, "http", 1, {"m": "GET", "p": "a"})[5:] == ["", [], b"", b""]


@given(
    call_id=st.integers(0, wire.MAX_CALL_ID),
    version=st.integers(0, wire.MAX_CALL_ID),
    size=st.sampled_from([0, 1, 127, 255, 256, 16_383, 16_384, 65_535, 65_536]),
    path=st.text(max_size=40),
    query=st.one_of(st.just(""), st.text(max_size=20)),
    headers=st.lists(
        st.tuples(st.one_of(st.just("content-type"), st.text(max_size=10)), st.text(max_size=300)),
        max_size=4,
    ),
)
def test_an_http_request_packed_from_its_head(
    call_id: int, version: int, size: int, path: str, query: str, headers: list[tuple[str, str]]
) -> None:
    """`encode_http_request` with a route's packed head is byte for byte what the
    general encoder makes of the request's items, and decodes to the same frame; a
    plain append's route (no query, its Content-Type its one header) makes the `append`
    frame instead, which stands for the same request."""
    body = b"b" * size
    fields = {"m": "POST", "p": path, "q": query, "h": headers, "b": body}
    head = wire.pack_http_head("POST", path, query, headers)
    parts = wire.encode_http_request(call_id, version, head, body)
    general = wire.encode_parts(wire.request_items(call_id, "http", version, fields))
    plain = query == "" and len(headers) == 1 and headers[0][0] == "content-type"
    if plain:
        items = wire.append_items(call_id, version, path, headers[0][1], body)
        assert parts == wire.encode_parts(items)
    else:
        assert parts == general
    assert len(parts) == (2 if size >= wire.RAW_BODY_BYTES else 1)
    (frame,) = wire.FrameDecoder().feed(b"".join(parts))
    (expected,) = wire.FrameDecoder().feed(b"".join(general))
    if plain:
        assert frame["k"] == "append"
        frame = wire.general_request(frame)
    assert frame == expected
    assert frame["k"] == "req" and frame["i"] == call_id and frame["r"] == version  # type: ignore[typeddict-item]
    assert (frame["p"], frame["q"], frame["b"]) == (path, query, body)  # type: ignore[typeddict-item]


def test_an_http_request_too_large_refused() -> None:
    """A request over the frame limit is refused as the general encoder refuses it."""
    head = wire.pack_http_head("POST", "a", "", [])
    body = b"x" * (wire.MAX_FRAME_BYTES - 10)
    with pytest.raises(wire.WireError):
        wire.encode_parts(
            wire.request_items(1, "http", 1, {"m": "POST", "p": "a", "q": "", "h": [], "b": body})
        )
    with pytest.raises(wire.WireError):
        wire.encode_http_request(1, 1, head, body)
