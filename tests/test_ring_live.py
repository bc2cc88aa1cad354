"""The gateway side of live rings: the RPC pool learns rings from the shards' answers,
connects to new shards and drops departed ones, brings a shard on an older ring up to
date (`ring_set`), waits out moving streams; and, end to end with real shard and gateway
processes, a gateway on an old ring keeps serving writers and live readers (long-poll and
SSE) while a ring change moves their streams to a new shard: no client error, no gap, no
duplicate."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.auth import TEST_SECRET, open_authenticated, secret_args
from support.fakeshard import FakeShard, Reply, ThreadedShard
from support.processes import GatewayProcess, ShardProcess, free_port, gateway_for

from ds_cluster.common import wire
from ds_cluster.common.ring import Ring, format_endpoint
from ds_cluster.common.rpc_client import ROUTE_DEADLINE, ShardError, ShardPool
from ds_cluster.gateway import fanout


class RingShard:
    """What a shard does with rings, for FakeShard: fences other ring versions (`err
    version` with its ring), refuses paths it does not own (`err misdirected`), takes
    newer rings from `ring_set`, and answers the paths it owns with its id."""

    def __init__(self, shard_id: str, ring: Ring) -> None:
        self.ring = ring
        self.fake = FakeShard(shard_id, self.handle)
        self.served: list[str] = []
        self.ring_sets: list[int] = []

    async def handle(self, msg: dict[str, Any], reply: Reply) -> None:
        ring, i = self.ring, msg["i"]
        if msg["op"] == "ring_set":
            given = Ring.from_wire(msg["a"]["ring"])
            self.ring_sets.append(given.version)
            if given.version > ring.version:
                self.ring = given
            return await reply({"k": "res", "i": i, "a": {"ring": self.ring.to_wire()}})
        if msg["r"] != ring.version:
            err = {"code": "version", "msg": "other ring", "a": {"ring": ring.to_wire()}}
            return await reply({"k": "err", "i": i, **err})
        path = msg["p"] if msg["op"] == "http" else msg["a"]["key"]
        if not ring.owns(self.fake.shard_id, path):
            err = {"code": "misdirected", "msg": "not mine", "a": {"ring": ring.to_wire()}}
            return await reply({"k": "err", "i": i, **err})
        self.served.append(path)
        if msg["op"] != "http":
            return await reply({"k": "res", "i": i, "a": {"by": self.fake.shard_id}})
        body = self.fake.shard_id.encode()
        await reply({"k": "res", "i": i, "s": 200, "h": [], "b": body, "more": False})


def address(shard: FakeShard) -> tuple[str, int]:
    return ("127.0.0.1", shard.port)


def owned_by(ring: Ring, shard_id: str, prefix: str = "p") -> str:
    return next(f"{prefix}{n}" for n in range(10_000) if ring.owner(f"{prefix}{n}") == shard_id)


def get(path: str) -> dict[str, object]:
    return {"m": "GET", "p": path, "q": "", "h": [], "b": b""}


async def routed_body(pool: ShardPool, path: str) -> bytes:
    with trio.fail_after(10):
        async with await pool.open_routed(path, "http", get(path)) as call:
            return (await call.response())["b"]


async def test_the_pool_follows_rings_the_shards_answer_with() -> None:
    s1, s2 = RingShard("s1", Ring(1, ("s1",))), RingShard("s2", Ring(1, ("s2",)))
    async with trio.open_nursery() as nursery:
        for shard in (s1, s2):
            await nursery.start(shard.fake.run)
        both = Ring(2, ("s1", "s2"), {"s1": address(s1.fake), "s2": address(s2.fake)})
        s1.ring = s2.ring = both
        start = Ring(1, ("s1",), {"s1": address(s1.fake)})
        async with ShardPool({}, start, role="gateway", name="g", secret=TEST_SECRET) as pool:
            with trio.fail_after(5):
                await pool.wait_connected("s1")
            # s1 is on a newer ring (err version): the pool adopts it, connects to s2, and
            # the request lands on its owner there.
            path = owned_by(both, "s2")
            assert await routed_body(pool, path) == b"s2"
            assert pool.ring == both and pool.connected("s2") and s2.served == [path]

            # An op routed by a key follows the ring the same way.
            key = owned_by(both, "s1", "k")
            got = await pool.call_routed(key, "sub_http", {"key": key}, timeout=10)
            assert got == {"by": "s1"} and s1.served == [key]

            # A ring without s1: its connection is closed; everything goes to s2.
            only_s2 = Ring(3, ("s2",), {"s2": address(s2.fake)})
            s1.ring = s2.ring = only_s2
            path = owned_by(both, "s1")
            assert await routed_body(pool, path) == b"s2"
            assert pool.ring.version == 3 and set(pool.connections) == {"s2"}
            assert pool.problems() == {}
        nursery.cancel_scope.cancel()


async def test_a_misdirected_answer_teaches_the_ring_without_a_version_gap() -> None:
    """A shard on our ring version that no longer owns a path (its ring moved on, ours
    did not yet): `err misdirected` carries its ring, and the request follows it."""
    s1, s2 = RingShard("s1", Ring(1, ("s1",))), RingShard("s2", Ring(1, ("s2",)))
    async with trio.open_nursery() as nursery:
        for shard in (s1, s2):
            await nursery.start(shard.fake.run)
        newer = Ring(2, ("s1", "s2"), {"s1": address(s1.fake), "s2": address(s2.fake)})
        start = Ring(2, ("s1", "s3"), {"s1": address(s1.fake), "s3": ("127.0.0.1", 9)})
        s1.ring = s2.ring = newer
        path = next(
            f"m{n}"
            for n in range(10_000)
            if start.owner(f"m{n}") == "s1" and newer.owner(f"m{n}") == "s2"
        )
        async with ShardPool({}, start, role="gateway", name="g", secret=TEST_SECRET) as pool:
            with trio.fail_after(5):
                await pool.wait_connected("s1")
            # Same version: the pool keeps its ring, and retries until the deadline.
            with trio.fail_after(10):
                async with await pool.open_routed(path, "http", get(path)) as call:
                    with pytest.raises(ShardError) as info:
                        await call.response()
            assert info.value.code == "misdirected"
            assert pool.ring == start
            pool.adopt(Ring(1, ("s1",), {"s1": address(s1.fake)}))  # older: ignored
            assert pool.ring == start
            # Once the shards' ring is a version up, the answer is adopted and followed.
            third = Ring(3, newer.shard_ids, newer.endpoints)
            s1.ring = s2.ring = third
            assert await routed_body(pool, path) == b"s2"
            assert pool.ring == third and set(pool.connections) == {"s1", "s2"}
        nursery.cancel_scope.cancel()


async def test_a_shard_on_an_older_ring_is_brought_up_to_ours() -> None:
    shard = RingShard("s1", Ring(1, ("s1",)))
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.fake.run)
        ours = Ring(2, ("s1",), {"s1": address(shard.fake)})
        async with ShardPool({}, ours, role="gateway", name="g", secret=TEST_SECRET) as pool:
            with trio.fail_after(5):
                await pool.wait_connected("s1")
            assert await routed_body(pool, "a") == b"s1"
            assert shard.ring_sets == [2] and shard.ring.version == 2
            assert pool.ring == ours  # the shard's older ring was not taken
        nursery.cancel_scope.cancel()


async def test_a_moving_stream_is_waited_for_then_given_up_on() -> None:
    answers = {"tries": 0, "moving_for": 3}

    async def moving_then_served(msg: dict[str, Any], reply: Reply) -> None:
        answers["tries"] += 1
        if answers["tries"] <= answers["moving_for"]:
            a = {"retry_after": 0.05}
            return await reply({"k": "err", "i": msg["i"], "code": "moving", "msg": "x", "a": a})
        await reply({"k": "res", "i": msg["i"], "s": 204, "h": [], "b": b"", "more": False})

    shard = FakeShard("s1", moving_then_served)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        ring = Ring(1, ("s1",), {"s1": address(shard)})
        async with ShardPool({}, ring, role="gateway", name="g", secret=TEST_SECRET) as pool:
            with trio.fail_after(5):
                await pool.wait_connected("s1")
            with trio.fail_after(10):
                async with await pool.open_routed("a", "http", get("a")) as call:
                    assert (await call.response())["s"] == 204
            assert answers["tries"] == 4

            answers.update(tries=0, moving_for=10**6)
            started = trio.current_time()
            with trio.fail_after(10):
                async with await pool.open_routed("a", "http", get("a")) as call:
                    with pytest.raises(ShardError) as info:
                        await call.response()
            assert info.value.code == "moving" and info.value.retry_after == 0.05
            assert trio.current_time() - started >= ROUTE_DEADLINE * 0.9
            assert answers["tries"] > 3
        nursery.cancel_scope.cancel()


async def always_moving(msg: dict[str, Any], reply: Reply) -> None:
    a = {"retry_after": 2.5}
    await reply({"k": "err", "i": msg["i"], "code": "moving", "msg": "on its way", "a": a})


async def always_misdirected(msg: dict[str, Any], reply: Reply) -> None:
    a = {"ring": {"version": 1, "shards": ["s1"], "endpoints": {}}}
    await reply({"k": "err", "i": msg["i"], "code": "misdirected", "msg": "not here", "a": a})


@pytest.mark.parametrize(
    ("handler", "retry_after"), [(always_moving, "3"), (always_misdirected, "1")]
)
def test_the_client_gets_503_with_retry_after_never_a_4xx(handler: Any, retry_after: str) -> None:
    shard = ThreadedShard(FakeShard("s1", handler))
    shard.start()
    try:
        with gateway_for(shard) as gateway:
            started = time.monotonic()
            response = httpx.post(f"{gateway.url}/v1/stream/a", content=b"x", timeout=30)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == retry_after
            assert time.monotonic() - started >= ROUTE_DEADLINE * 0.9  # it waited first
    finally:
        shard.stop()


# ---- end to end: real shards, a real gateway ---------------------------------------------

MOVE_DEADLINE = 120.0
TEXT = "text/plain"


class Shards:
    """Shard processes on ports reserved up front, and an admin RPC pool to them."""

    def __init__(self, tmp: Path, ids: list[str]) -> None:
        self.tmp = tmp
        self.ports = {sid: free_port() for sid in ids}
        self.procs: dict[str, ShardProcess] = {}
        self.gateways: list[GatewayProcess] = []

    def __enter__(self) -> Shards:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Every gateway started by `gateway` must exit cleanly (status 0); the shards
        are stopped either way."""
        try:
            for gateway in self.gateways:
                assert gateway.stop() == 0
        finally:
            self.stop()

    def ring(self, version: int, ids: list[str]) -> Ring:
        return Ring(version, tuple(ids), {sid: ("127.0.0.1", self.ports[sid]) for sid in ids})

    @staticmethod
    def spec(ring: Ring) -> str:
        return ",".join(f"{sid}={format_endpoint(ep)}" for sid, ep in ring.endpoints.items())

    def start(self, shard_id: str, ring: Ring) -> None:
        self.procs[shard_id] = ShardProcess(
            self.tmp,
            shard_id,
            *secret_args(self.tmp),
            "--ring-version",
            str(ring.version),
            port=self.ports[shard_id],
            peers=self.spec(ring),
        )

    def gateway(self, ring: Ring, *extra: str) -> GatewayProcess:
        """A gateway process on `ring`, ready; stopped when the `with` block ends."""
        gateway = GatewayProcess(self.spec(ring), *extra)
        self.gateways.append(gateway)
        assert gateway.wait_ready(timeout=30).status_code == 200
        return gateway

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        for sid, proc in self.procs.items():
            print(f"----- {sid} -----\n{''.join(proc.lines[-30:])}")


@asynccontextmanager
async def admin_pool(shards: Shards, ring: Ring) -> AsyncIterator[ShardPool]:
    async with ShardPool(
        {}, ring, role="gateway", name="admin", secret=TEST_SECRET, drop_departed=False
    ) as pool:
        yield pool


async def wait_moved(pool: ShardPool, ids: list[str], version: int) -> None:
    give_up = trio.current_time() + MOVE_DEADLINE
    while True:
        statuses = []
        for sid in ids:
            try:
                statuses.append(await pool.call(sid, "move_status", {}, timeout=5))
            except Exception:  # not connected yet, busy: asked again
                statuses.append({})
        if all(s.get("done") and s["ring"]["version"] == version for s in statuses):  # type: ignore[index]
            return
        assert trio.current_time() < give_up, statuses
        await trio.sleep(0.3)


def sse_payloads(buffer: bytearray) -> list[bytes]:
    """The data of the complete `event: data` events in `buffer` (taken out of it)."""
    out = []
    while (end := buffer.find(b"\n\n")) >= 0:
        event = bytes(buffer[:end])
        del buffer[: end + 2]
        lines = event.split(b"\n")
        if lines[0] == b"event: data":
            out.append(b"\n".join(line[5:] for line in lines[1:]))
    return out


class Traffic:
    """An idempotent writer and two live readers (SSE, long-poll) of one stream through
    a gateway, and a writer on a stream that does not move, run while a ring changes."""

    APPENDS = 60

    def __init__(self, http: httpx.AsyncClient, name: str, stays: str) -> None:
        self.http, self.name, self.stays = http, name, stays
        self.expected = b"".join(b"r%03d;" % n for n in range(self.APPENDS))
        self.sse_got, self.poll_got = bytearray(), bytearray()
        self.statuses: list[int] = []
        self.durations: list[float] = []  # each write, its retries after a 503 included
        self.sse_ready, self.writes_done = trio.Event(), trio.Event()

    async def run(self, change: Callable[[], Awaitable[None]]) -> None:
        """Create the streams, start the clients, `change` the ring while they run, and
        return once every client is done."""
        for stream in (self.name, self.stays):
            r = await self.http.put(f"/v1/stream/{stream}", headers={"Content-Type": TEXT})
            assert r.status_code == 201, r.text
        with trio.fail_after(MOVE_DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.sse_reader)
                nursery.start_soon(self.long_poller)
                await self.sse_ready.wait()
                nursery.start_soon(self.writer)
                await trio.sleep(0.5)  # some writes before the change
                await change()

    async def sse_reader(self) -> None:
        buffer = bytearray()
        url = f"/v1/stream/{self.name}?offset=-1&live=sse"
        async with self.http.stream("GET", url) as response:
            assert response.status_code == 200
            self.sse_ready.set()
            async for data in response.aiter_raw():
                buffer += data
                for payload in sse_payloads(buffer):
                    self.sse_got.extend(payload)
                if len(self.sse_got) >= len(self.expected):
                    return

    async def long_poller(self) -> None:
        offset = "-1"
        while len(self.poll_got) < len(self.expected):
            query = {"offset": offset, "live": "long-poll"}
            r = await self.http.get(f"/v1/stream/{self.name}", params=query)
            assert r.status_code in (200, 204), (r.status_code, r.text)
            self.poll_got.extend(r.content)
            offset = r.headers["stream-next-offset"]

    async def writer(self) -> None:
        for n in range(self.APPENDS):
            headers = {"Content-Type": TEXT, "Producer-Id": "w", "Producer-Epoch": "0"}
            headers["Producer-Seq"] = str(n)
            started = time.monotonic()
            while True:  # a 503 (with Retry-After) is retried: same seq, no duplicate
                r = await self.http.post(
                    f"/v1/stream/{self.name}", content=b"r%03d;" % n, headers=headers
                )
                self.statuses.append(r.status_code)
                if r.status_code != 503:
                    break
                await trio.sleep(float(r.headers["retry-after"]))
            assert r.status_code in (200, 204), (n, r.status_code, r.text)
            self.durations.append(time.monotonic() - started)
            r = await self.http.post(
                f"/v1/stream/{self.stays}", content=b"s", headers={"Content-Type": TEXT}
            )
            assert r.status_code == 204, r.text
            await trio.sleep(0.05)
        self.writes_done.set()

    async def check(self, gateway: GatewayProcess, version: int) -> None:
        """Every write landed once, in order; both readers saw exactly that; no client
        error; the gateway follows the new ring, and resumed the SSE on the new owner."""
        assert self.writes_done.is_set()
        r = await self.http.get(f"/v1/stream/{self.name}", params={"offset": "-1"})
        assert r.status_code == 200 and r.content == self.expected
        assert bytes(self.sse_got) == self.expected
        assert bytes(self.poll_got) == self.expected
        assert all(s < 400 or s == 503 for s in self.statuses), self.statuses
        assert any(f"ring v{version} adopted" in line for line in gateway.lines)
        assert any("resuming on its owner" in line for line in gateway.lines)
        assert (await self.http.get("/readyz")).status_code == 200
        print(f"longest write {max(self.durations):.3f}s; statuses {sorted(set(self.statuses))}")


async def owner_now(admin: ShardPool, ids: list[str], name: str) -> str:
    """The one shard that serves `name` (the others send callers elsewhere)."""
    owners = []
    for sid in ids:
        async with admin.open(sid, "http", {**get(name), "m": "HEAD"}) as call:
            try:
                if (await call.response())["s"] == 200:
                    owners.append(sid)
            except ShardError as exc:
                assert exc.code == "misdirected", exc
    assert len(owners) == 1, owners
    return owners[0]


@pytest.mark.slow
async def test_clients_follow_a_new_shard_through_a_gateway_on_the_old_ring(
    tmp_path: Path,
) -> None:
    with Shards(tmp_path, ["s0", "s1"]) as shards:
        one, two = shards.ring(1, ["s0"]), shards.ring(2, ["s0", "s1"])
        shards.start("s0", one)
        gateway = shards.gateway(one)  # on ring v1: it learns v2 from s0
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
            admin_pool(shards, two) as admin,
        ):
            # a stream the ring change moves from s0 to s1, and one it leaves on s0
            traffic = Traffic(http, owned_by(two, "s1", "moving-"), owned_by(two, "s0", "stay-"))

            async def grow() -> None:
                shards.start("s1", two)
                await admin.call("s0", "ring_set", {"ring": two.to_wire()}, timeout=10)
                await wait_moved(admin, ["s0", "s1"], 2)

            await traffic.run(grow)
            await traffic.check(gateway, 2)
            assert await owner_now(admin, ["s0", "s1"], traffic.name) == "s1"


@pytest.mark.slow
async def test_clients_follow_a_departing_shard_s_streams_and_the_gateway_lets_it_go(
    tmp_path: Path,
) -> None:
    with Shards(tmp_path, ["s0", "s1"]) as shards:
        two, three = shards.ring(1, ["s0", "s1"]), shards.ring(2, ["s0"])
        for sid in ("s0", "s1"):
            shards.start(sid, two)
        gateway = shards.gateway(two)
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
            admin_pool(shards, two) as admin,
        ):
            traffic = Traffic(http, owned_by(two, "s1", "leaving-"), owned_by(two, "s0", "stay-"))

            async def shrink() -> None:
                await admin.call("s1", "ring_set", {"ring": three.to_wire()}, timeout=10)
                await wait_moved(admin, ["s0", "s1"], 2)

            await traffic.run(shrink)
            await traffic.check(gateway, 2)
            admin.adopt(three)
            assert await owner_now(admin, ["s0", "s1"], traffic.name) == "s0"
            # The gateway closed its connection to s1: s1 may go, the gateway stays ready.
            shards.procs["s1"].stop()
            assert any("shard s1 left the ring" in line for line in gateway.lines)
            await trio.sleep(1.5)  # a connection it still held would now report a problem
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            r = await http.get(f"/v1/stream/{traffic.name}", params={"offset": "-1"})
            assert r.content == traffic.expected


@pytest.mark.slow
async def test_a_gateway_on_a_newer_ring_brings_the_shard_to_it(tmp_path: Path) -> None:
    with Shards(tmp_path, ["s0"]) as shards:
        shards.start("s0", shards.ring(1, ["s0"]))
        gateway = shards.gateway(shards.ring(1, ["s0"]), "--ring-version", "2")
        # The shard answers `err version` (older); the gateway sends it `ring_set` and the
        # request then runs: the client sees only its 201.
        response = httpx.put(f"{gateway.url}/v1/stream/fenced", timeout=30)
        assert response.status_code == 201, response.text
        stream, _, ready = await open_authenticated(
            ("127.0.0.1", shards.ports["s0"]), "s0", ring_version=2
        )
        await trio.aclose_forcefully(stream)
        assert ready["ring"]["version"] == 2  # type: ignore[typeddict-item]


# ---- pure pieces -------------------------------------------------------------------------


def test_an_sse_upstream_resumes_from_the_last_control_event() -> None:
    data = b'event: data\ndata:x\n\nevent: control\ndata:{"streamNextOffset":"0000_0002"}\n\n'
    assert fanout._last_offset(data) == "0000_0002"
    assert fanout._last_offset(data + b"event: data\ndata:y\n\n") == "0000_0002"
    two = data + b'event: control\ndata:{"streamNextOffset":"0000_0003","upToDate":true}\n\n'
    assert fanout._last_offset(two) == "0000_0003"
    # A payload that looks like a control event is not one (its lines start with data:).
    fake = b'event: data\ndata:event: control\ndata:{"streamNextOffset":"9999_9999"}\n\n'
    assert fanout._last_offset(fake) is None
    assert fanout._last_offset(b'event: control\ndata:{"streamNextOffset":"a&b=c"}\n\n') is None
    fields = {"m": "GET", "p": "s", "q": "offset=-1&live=sse&cursor=5", "h": [], "b": b""}
    resumed = fanout._resumed(fields, "0000_0003")
    assert resumed["q"] == "live=sse&cursor=5&offset=0000_0003"
    assert fanout._resumed(fields, None)["q"] == fields["q"]  # nothing relayed yet


def test_a_peer_on_another_wire_version_is_named_in_the_error() -> None:
    hello = {"v": 3, "k": "hello", "role": "gateway", "id": "g", "nonce": b"n" * 32, "r": 1}
    expected = f"wire version 3, this process speaks {wire.WIRE_VERSION}"
    with pytest.raises(wire.WireError, match=expected):
        wire.FrameDecoder().feed(wire.encode(hello))
