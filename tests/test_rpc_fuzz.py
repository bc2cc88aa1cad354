"""Property-based fuzzing of the RPC frame schema against live processes (hypothesis).

Frames that look valid with any field replaced by any type (or dropped, or joined by an
unknown field), raw garbage and truncated frames go to a LIVE shard process, before and
after authentication, and, from a fake shard, to a LIVE gateway process as its replies.
After every example the process still runs; a fresh honest connection (or HTTP request)
is served. Bounded by `max_examples` so the file runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.auth import TEST_SECRET, secret_args
from support.fakeshard import FakeShard, Reply, ThreadedShard
from support.processes import GatewayProcess, ShardProcess

from ds_cluster.common import wire
from ds_cluster.common.cluster_auth import ClientHandshake

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ_GATEWAY = settings(FUZZ, max_examples=100)  # each example is an HTTP request or two

# ---- strategies ---------------------------------------------------------------------------

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=16),
    st.binary(max_size=32),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4), st.binary(max_size=4)), max_size=3),
    st.lists(st.lists(st.text(max_size=6), min_size=2, max_size=2), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-3, 3), st.text(max_size=4))),
)

V = wire.WIRE_VERSION
# The handshake's frames are maps; every other kind is positional (common/wire.py).
TEMPLATES: dict[str, dict[str, Any] | list[Any]] = {
    "req-http": [
        wire.REQ_HTTP,
        1,
        1,
        "PUT",
        "fuzz/a",
        "",
        [["content-type", "application/json"]],
        b"",
        b"[1]",
    ],
    "req-ping": [wire.REQ_OP, 2, 1, "ping", {}],
    "req-op": [wire.REQ_OP, 3, 1, "release_fork", {"source": "a"}],
    "cancel": [wire.CANCEL, 1],
    "hello": {"v": V, "k": "hello", "role": "gateway", "id": "fz", "nonce": b"n" * 32, "r": 1},
    "auth": {"v": V, "k": "auth", "mac": b"m" * 32},
    "ready": {"v": V, "k": "ready", "ring": {"version": 1, "shards": ["s1"]}, "health": {}},
    "res": [wire.RES_HTTP, 1, 200, False, [["x-a", "b"]], b"", False, b"ok"],
    "res-more": [wire.RES_HTTP, 1, 200, True, [], b"", False, b"data: x\n\n"],
    "res-token": [wire.RES_HTTP, 1, 200, False, [], b"t" * 56, False, b"x" * 100],
    "res-hit": [wire.RES_HTTP, 1, 200, False, [], b"t" * 56, True, b""],
    "res-op": [wire.RES_OP, 1, {"health": {"storage": "ok"}}],
    "chunk": [wire.CHUNK, 1, True, b"data: y\n\n"],
    "chunk-end": [wire.CHUNK, 1, False, b""],
    "err": [wire.ERR, 1, "internal", "x", None],
    "err-ring": [wire.ERR, 1, "misdirected", "x", {"ring": {"version": 1, "shards": ["s1"]}}],
}


def pack(frame: Any) -> bytes:
    body = msgpack.packb(frame, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@st.composite
def mutated_frames(draw: st.DrawFn, kinds: tuple[str, ...] = tuple(TEMPLATES)) -> Any:
    """A template frame with up to three fields (a map's) or items (an array's, its kind
    tag included) replaced by any value or dropped, and sometimes an unknown field or an
    extra item added."""
    template = TEMPLATES[draw(st.sampled_from(kinds))]
    if isinstance(template, list):
        items = list(template)
        for index in draw(st.lists(st.integers(0, len(items) - 1), max_size=3, unique=True)):
            items[index] = draw(VALUES)
        if draw(st.integers(0, 4)) == 0:
            del items[draw(st.integers(0, len(items) - 1)) :]  # too few items
        if draw(st.integers(0, 5)) == 0:
            items.append(draw(VALUES))  # one too many
        return items
    frame = dict(template)
    for key in draw(st.lists(st.sampled_from(sorted(frame)), max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            del frame[key]
        else:
            frame[key] = draw(VALUES)
    if draw(st.integers(0, 5)) == 0:
        frame[draw(st.text(max_size=4))] = draw(VALUES)
    return frame


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Bytes to send: mutated frames, raw garbage, or a frame cut short."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.binary(min_size=1, max_size=300))
    if choice == 1:
        whole = pack(draw(mutated_frames()))
        return whole[: draw(st.integers(1, len(whole) - 1))]
    if choice == 2:  # a length prefix that lies
        body = pack(draw(mutated_frames()))[4:]
        return struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + body
    return b"".join(pack(f) for f in draw(st.lists(mutated_frames(), min_size=1, max_size=3)))


# ---- the schema, as pure code ---------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(payloads())
def test_decoder_yields_checked_frames_or_wire_error_only(data: bytes) -> None:
    """Whatever the bytes, the decoder returns frames that passed `parse` or raises
    WireError: no other exception reaches a reader loop."""
    try:
        frames = wire.FrameDecoder().feed(data)
    except wire.WireError:
        return
    for frame in frames:
        assert frame["k"] in TEMPLATE_KINDS
        if frame["k"] in ("hello", "auth", "ready"):
            assert frame["v"] == wire.WIRE_VERSION
        else:
            assert type(frame["i"]) is int and "v" not in frame


TEMPLATE_KINDS = {"hello", "auth", "ready", "req", "res", "chunk", "cancel", "err"}


# ---- a plain-socket wire client -----------------------------------------------------------


class WireSocket:
    """A blocking wire connection (hypothesis drives examples synchronously)."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.decoder = wire.FrameDecoder()
        self.frames: deque[wire.Frame] = deque()

    def receive(self) -> wire.Frame | None:
        """The next frame, or None once the peer closed the connection."""
        while not self.frames:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    def authenticate(self, shard_id: str) -> None:
        ring: wire.RingInfo = {"version": 1, "shards": [shard_id]}
        handshake = ClientHandshake(
            TEST_SECRET, role="gateway", name="fuzz", shard_id=shard_id, ring=ring
        )
        self.sock.sendall(wire.encode(handshake.hello()))
        hello = self.receive()
        assert hello is not None
        self.sock.sendall(wire.encode(handshake.on_server_hello(hello)))
        ready = self.receive()
        assert ready is not None
        handshake.on_ready(ready)

    def send_and_close(self, data: bytes) -> None:
        """Send `data`, end our side, and read until the peer closes (5 s at most)."""
        try:
            self.sock.sendall(data)
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            self.sock.close()


def honest_exchange(address: tuple[str, int], shard_id: str) -> None:
    conn = WireSocket(address)
    try:
        conn.authenticate(shard_id)
        conn.sock.sendall(wire.encode({"k": "req", "i": 1, "r": 1, "op": "ping", "a": {}}))
        answer = conn.receive()
        assert answer is not None and answer["k"] == "res" and answer["i"] == 1
    finally:
        conn.sock.close()


# ---- a live shard -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShardProcess]:
    tmp = tmp_path_factory.mktemp("fuzz-shard")
    shard = ShardProcess(tmp, "s1", *secret_args(tmp))
    yield shard
    shard.stop()
    assert_no_traceback(shard.lines)


class Checker:
    """Per example: the process lives; every 10th, an honest connection is served."""

    def __init__(self, shard: ShardProcess) -> None:
        self.shard = shard
        self.count = 0

    def __call__(self) -> None:
        assert self.shard.alive(), "".join(self.shard.lines[-40:])
        self.count += 1
        if self.count % 10 == 0:
            honest_exchange(self.shard.address, self.shard.shard_id)


def test_fuzzed_frames_after_authentication_cost_only_their_connection(
    live_shard: ShardProcess,
) -> None:
    check = Checker(live_shard)

    @FUZZ
    @given(payloads())
    def one(data: bytes) -> None:
        conn = WireSocket(live_shard.address)
        conn.authenticate(live_shard.shard_id)
        conn.send_and_close(data)
        check()

    one()
    honest_exchange(live_shard.address, live_shard.shard_id)


def test_fuzzed_frames_before_authentication_cost_only_their_connection(
    live_shard: ShardProcess,
) -> None:
    check = Checker(live_shard)

    @FUZZ
    @given(payloads())
    def one(data: bytes) -> None:
        WireSocket(live_shard.address).send_and_close(data)
        check()

    one()
    honest_exchange(live_shard.address, live_shard.shard_id)


# ---- a live gateway in front of a hostile shard -------------------------------------------

SCRIPT: deque[list[Any]] = deque()
SCRIPT_LOCK = threading.Lock()
OWN_ID = "<the request's id>"  # in a scripted array frame: replaced by the request's id


async def hostile(msg: dict[str, Any], reply: Reply) -> None:
    """Answer with the scripted frames (maps get this request's id unless they carry
    their own, arrays where they hold OWN_ID), then a valid final answer."""
    with SCRIPT_LOCK:
        script = SCRIPT.popleft() if SCRIPT else []
    for item in script:
        if type(item) is dict and "i" not in item:
            item = dict(item, i=msg["i"])
        elif type(item) is list:
            item = [msg["i"] if value == OWN_ID else value for value in item]
        await reply(item if type(item) is bytes else pack(item))
    await reply({"k": "res", "i": msg["i"], "s": 200, "h": [], "b": b"end", "more": False})


@st.composite
def replies(draw: st.DrawFn) -> list[Any]:
    shard_kinds = (
        "res",
        "res-more",
        "res-op",
        "chunk",
        "chunk-end",
        "err",
        "err-ring",
        "hello",
        "ready",
    )
    items: list[Any] = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 5)) == 0:
            # Garbage behind a length no frame may have: a shard that stalls inside a
            # frame is the heartbeat's to catch (test_rpc_client), in seconds, not here.
            size = draw(st.integers(wire.MAX_FRAME_BYTES + 1, 2**32 - 1))
            items.append(struct.pack(">I", size) + draw(st.binary(max_size=100)))
            continue
        frame = draw(mutated_frames(shard_kinds))
        if isinstance(frame, list):
            if len(frame) > 1 and frame[1] == 1 and draw(st.booleans()):
                frame[1] = OWN_ID  # the request's own id: the frame reaches the waiting call
        elif "i" in frame and frame["i"] == 1 and draw(st.booleans()):
            del frame["i"]  # the request's own id: the frame reaches the waiting call
        items.append(frame)
    return items


@pytest.fixture(scope="module")
def hostile_gateway() -> Iterator[GatewayProcess]:
    shard = ThreadedShard(FakeShard("s1", hostile))
    port = shard.start()
    gateway = GatewayProcess(f"s1=127.0.0.1:{port}")
    try:
        assert gateway.wait_ready().status_code == 200
        yield gateway
    finally:
        code = gateway.stop()
        shard.stop()
        assert code == 0, "".join(gateway.lines[-40:])


REQUESTS = [
    ("GET", "/v1/stream/fz?offset=-1", b""),
    ("POST", "/v1/stream/fz", b"[1]"),
    ("HEAD", "/v1/stream/fz", b""),
    ("GET", "/v1/stream/fz?offset=-1&live=sse", b""),
    ("GET", "/v1/stream/fz?offset=-1&live=long-poll", b""),
]


def test_fuzzed_shard_replies_cannot_crash_a_gateway(hostile_gateway: GatewayProcess) -> None:
    gateway = hostile_gateway
    client = httpx.Client(base_url=gateway.url, timeout=5)

    @FUZZ_GATEWAY
    @given(replies(), st.sampled_from(REQUESTS))
    def one(script: list[bytes | dict[str, Any]], req: tuple[str, str, bytes]) -> None:
        with SCRIPT_LOCK:
            SCRIPT.clear()
            SCRIPT.append(script)
        method, target, body = req
        with contextlib.suppress(httpx.HTTPError):  # a broken answer is fine, not a dead gateway
            client.request(method, target, content=body, headers={"content-type": "text/plain"})
        assert gateway.proc.poll() is None, "".join(gateway.lines[-40:])
        ready = gateway.wait_ready(timeout=10)
        assert ready.status_code == 200, ready.text

    try:
        one()
        with SCRIPT_LOCK:
            SCRIPT.clear()
        response = client.get("/v1/stream/fz", params={"offset": "-1"})
        assert response.status_code == 200 and response.content == b"end"
    finally:
        client.close()
    assert_no_traceback(gateway.lines)


def assert_no_traceback(lines: list[str]) -> None:
    """An unexpected error is logged with its traceback: show the first one."""
    text = "".join(lines)
    at = text.find("Traceback")
    assert at < 0, text[max(0, at - 2000) : at + 4000]
