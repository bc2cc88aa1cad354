"""common/rpc_client.py against an in-test wire server (the client is the unit under test)."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from support.auth import TEST_SECRET
from support.fakeshard import FakeShard, Handler, Reply, answer_204, forever

from ds_cluster.common import wire
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardTimeout, ShardUnavailable


def make_pool(shard: FakeShard, **kwargs: Any) -> ShardPool:
    ring = Ring(7, (shard.shard_id,))
    return ShardPool(
        {shard.shard_id: ("127.0.0.1", shard.port)},
        ring,
        role="gateway",
        name="t",
        secret=TEST_SECRET,
        **kwargs,
    )


@asynccontextmanager
async def connected_pool(
    handler: Handler = answer_204, **kwargs: Any
) -> AsyncIterator[tuple[FakeShard, ShardPool]]:
    """A fake shard "s1" answering with `handler`, and a pool connected to it; both ended
    after."""
    shard = FakeShard("s1", handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        async with make_pool(shard, **kwargs) as pool:
            await pool.wait_connected()
            yield shard, pool
        nursery.cancel_scope.cancel()


async def echo_shuffled(msg: dict[str, Any], reply: Reply) -> None:
    """Answer after a random delay, so replies come back out of order."""
    await trio.sleep(random.random() * 0.05)
    if msg["op"] == "http":
        await reply({"k": "res", "i": msg["i"], "s": 200, "h": [], "b": msg["b"], "more": False})
    elif msg["op"] == "export_fork":
        await reply({"k": "res", "i": msg["i"], "a": {"got": msg["a"]}})
    else:
        await reply({"k": "err", "i": msg["i"], "code": "bad_request", "msg": "nope"})


async def test_hello_then_connected() -> None:
    shard = FakeShard("s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        async with make_pool(shard) as pool:
            with trio.fail_after(5):
                await pool.wait_connected()
            assert pool.connected("s1") and pool.all_connected()
            assert shard.hellos[0]["role"] == "gateway"
            assert shard.hellos[0]["id"] == "t"
            assert shard.hellos[0]["r"] == 7
        nursery.cancel_scope.cancel()


async def test_many_concurrent_requests_out_of_order() -> None:
    results: dict[int, bytes] = {}
    async with connected_pool(echo_shuffled) as (shard, pool):

        async def one(n: int) -> None:
            body = f"body-{n}".encode()
            fields = {"m": "POST", "p": "x", "q": "", "h": [], "b": body}
            async with pool.open("s1", "http", fields) as call:
                res = await call.response()
                results[n] = res["b"]

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                for n in range(500):
                    inner.start_soon(one, n)
    assert results == {n: f"body-{n}".encode() for n in range(500)}
    # all on the one connection
    assert len(shard.hellos) == 1


async def test_large_bodies_cross_the_pool_intact_beside_small_calls() -> None:
    """Large request bodies go out as their own frame piece and large replies are joined
    off the loop (wire.complete); both must arrive byte-exact and in their calls, with
    small calls on the same connection interleaved."""
    sizes = [wire.DEFER_BYTES, wire.DEFER_BYTES + 3, 5 * 1024 * 1024 + 7, 64 * 1024]
    bodies = {n: random.randbytes(size) for n, size in enumerate(sizes)}
    bodies.update({n: f"small-{n}".encode() for n in range(len(sizes), 200)})
    results: dict[int, bytes] = {}
    async with connected_pool(echo_shuffled) as (shard, pool):

        async def one(n: int) -> None:
            fields = {"m": "POST", "p": "x", "q": "", "h": [], "b": bodies[n]}
            async with pool.open("s1", "http", fields) as call:
                results[n] = (await call.response())["b"]

        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                for n in bodies:
                    inner.start_soon(one, n)
    assert results.keys() == bodies.keys()
    assert all(results[n] == bodies[n] for n in bodies)
    assert len(shard.hellos) == 1


async def test_call_result_and_error() -> None:
    async with connected_pool(echo_shuffled) as (shard, pool):
        got = await pool.call("s1", "export_fork", {"source": "a"}, timeout=5)
        assert got == {"got": {"source": "a"}}
        with pytest.raises(ShardError) as info:
            await pool.call("s1", "release_fork", {"source": "a"}, timeout=5)
        assert info.value.code == "bad_request"


async def test_call_timeout_sends_cancel() -> None:
    async with connected_pool(forever) as (shard, pool):
        with pytest.raises(ShardTimeout) as info:
            await pool.call("s1", "export_fork", {}, timeout=0.1)
        assert info.value.sent
        with trio.fail_after(5):
            await shard.cancel_seen.wait()
        assert shard.cancelled == [shard.requests[0]["i"]]


async def sse(msg: dict[str, Any], reply: Reply) -> None:
    i = msg["i"]
    await reply(
        {
            "k": "res",
            "i": i,
            "s": 200,
            "h": [["content-type", "text/event-stream"]],
            "b": b"head;",
            "more": True,
        }
    )
    for n in range(int(msg["q"])):
        await trio.sleep(0.001)
        await reply({"k": "chunk", "i": i, "b": f"c{n};".encode(), "more": True})
    if msg["p"] == "endless":
        await trio.sleep(math.inf)
    await reply({"k": "chunk", "i": i, "b": b"", "more": False})


async def test_streaming_chunks_and_cancel_on_early_exit() -> None:
    async with connected_pool(sse) as (shard, pool):
        fields = {"m": "GET", "p": "finite", "q": "5", "h": [], "b": b""}
        async with pool.open("s1", "http", fields) as call:
            res = await call.response()
            assert res["more"] and res["b"] == b"head;"
            chunks = [c async for c in call.chunks()]
        assert chunks == [f"c{n};".encode() for n in range(5)]
        assert shard.cancelled == []  # completed: nothing to cancel

        fields = {"m": "GET", "p": "endless", "q": "3", "h": [], "b": b""}
        async with pool.open("s1", "http", fields) as call:
            await call.response()
            async for chunk in call.chunks():
                if chunk == b"c1;":
                    break
        with trio.fail_after(5):
            await shard.cancel_seen.wait()
        assert shard.cancelled == [shard.requests[-1]["i"]]


async def test_relay_hands_chunks_in_order_from_the_reader_and_raises_errors() -> None:
    """`Call.relay`: the chunks already delivered first, then each as the connection's
    reader gets it (the sink runs in the reader's task, not the relaying one); an `err`
    in the stream is raised, and a sink that raises loses only its chunk."""
    shard = FakeShard("s1", sse)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        async with make_pool(shard) as pool:
            await pool.wait_connected()
            fields = {"m": "GET", "p": "finite", "q": "200", "h": [], "b": b""}
            async with pool.open("s1", "http", fields) as call:
                await call.response()
                await trio.sleep(0.02)  # some chunks wait in the inbox (one a 1 ms)
                got: list[bytes] = []
                tasks: set[object] = set()

                def sink(body: bytes) -> None:
                    tasks.add(trio.lowlevel.current_task())
                    if body == b"c7;":
                        raise RuntimeError("a bug in the sink")
                    got.append(body)

                await call.relay(sink)
            assert got == [f"c{n};".encode() for n in range(200) if n != 7]
            assert len(tasks) == 2  # the relaying task's, then the reader's

        async def broken(msg: dict[str, Any], reply: Reply) -> None:
            await reply({"k": "res", "i": msg["i"], "s": 200, "h": [], "b": b"", "more": True})
            await reply({"k": "chunk", "i": msg["i"], "b": b"one;", "more": True})
            await trio.sleep(0.01)
            await reply({"k": "err", "i": msg["i"], "code": "moving", "msg": "elsewhere"})

        shard.handler = broken
        async with make_pool(shard) as pool:
            await pool.wait_connected()
            async with pool.open("s1", "http", fields) as call:
                await call.response()
                got = []
                with pytest.raises(ShardError, match="moving"):
                    await call.relay(got.append)
            assert got == [b"one;"]
        nursery.cancel_scope.cancel()


async def test_open_routed_hands_a_complete_response_early_from_the_reader() -> None:
    """`open_routed`'s `early`: a complete `res` is handed over once, by the connection's
    reader as it arrives (not the caller's task), and the caller still gets the frame; an
    `err` or a `res` that streams is not handed over."""
    shard = FakeShard("s1", echo_shuffled)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        async with make_pool(shard) as pool:
            await pool.wait_connected()
            me = trio.lowlevel.current_task()
            got: list[tuple[bytes, bool]] = []

            def early(res: Any) -> None:
                got.append((res["b"], trio.lowlevel.current_task() is me))

            fields = {"m": "GET", "p": "p", "q": "", "h": [], "b": b"hello"}
            async with await pool.open_routed("p", "http", fields, early=early) as call:
                assert got == [(b"hello", False)]  # before the caller's task had it
                assert (await call.response())["b"] == b"hello"
            assert got == [(b"hello", False)]
            got.clear()
            async with await pool.open_routed("p", "release_fork", {"a": {}}, early=early) as call:
                with pytest.raises(ShardError):
                    await call.response()
            shard.handler = sse
            fields = {"m": "GET", "p": "finite", "q": "3", "h": [], "b": b""}
            async with await pool.open_routed("p", "http", fields, early=early) as call:
                assert (await call.response())["more"]
                assert [body async for body in call.chunks()] == [b"c0;", b"c1;", b"c2;"]
            assert got == []
        nursery.cancel_scope.cancel()


async def test_slow_consumer_overflow_cancels() -> None:
    async def flood(msg: dict[str, Any], reply: Reply) -> None:
        await reply({"k": "res", "i": msg["i"], "s": 200, "h": [], "b": b"", "more": True})
        while True:
            await reply({"k": "chunk", "i": msg["i"], "b": b"x" * 4096, "more": True})

    async with connected_pool(flood, max_buffered=64 * 1024) as (shard, pool):
        fields = {"m": "GET", "p": "a", "q": "", "h": [], "b": b""}
        async with pool.open("s1", "http", fields) as call:
            await call.response()
            with trio.fail_after(5):
                await shard.cancel_seen.wait()  # we never read: overflow
            with pytest.raises(ShardUnavailable):
                async for _ in call.chunks():
                    pass
        assert pool.connected("s1")  # the connection itself is fine


async def test_fail_fast_when_down_and_reconnect() -> None:
    shard = FakeShard("s1", echo_shuffled)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)  # learn a port
        await shard.stop()
        async with make_pool(shard) as pool:
            await trio.sleep(0.2)
            assert not pool.connected("s1")
            with trio.fail_after(0.5):  # fast, not after a timeout
                with pytest.raises(ShardUnavailable) as info:
                    pool.open("s1", "http", {"m": "GET", "p": "a", "q": "", "h": [], "b": b""})
            assert info.value.sent is False
            with pytest.raises(ShardUnavailable):
                await pool.call("s1", "export_fork", {}, timeout=5)

            await nursery.start(shard.run)  # the shard comes back on its port
            with trio.fail_after(5):  # backoff is at most 2 s
                await pool.wait_connected("s1")
            got = await pool.call("s1", "export_fork", {"n": 1}, timeout=5)
            assert got == {"got": {"n": 1}}
        nursery.cancel_scope.cancel()


async def test_inflight_requests_fail_at_once_on_drop() -> None:
    outcomes: list[BaseException] = []
    async with connected_pool(forever) as (shard, pool):

        async def one() -> None:
            fields = {"m": "POST", "p": "a", "q": "", "h": [], "b": b"x"}
            async with pool.open("s1", "http", fields) as call:
                try:
                    await call.response()
                except ShardUnavailable as exc:
                    outcomes.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as inner:
                for _ in range(20):
                    inner.start_soon(one)
                while len(shard.requests) < 20:
                    await trio.sleep(0.01)
                await shard.stop()
        assert len(outcomes) == 20
        assert all(exc.sent for exc in outcomes)  # reached the shard: outcome unknown
        assert not pool.connected("s1")


async def test_unknown_shard_and_wrong_identity() -> None:
    shard = FakeShard("other")  # answers hello as "other"
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        ring = Ring(1, ("s1",))
        async with ShardPool(
            {"s1": ("127.0.0.1", shard.port)}, ring, role="shard", name="s0", secret=TEST_SECRET
        ) as pool:
            await trio.sleep(0.3)
            assert not pool.connected("s1")  # refuses a shard that is not who we expect
            with pytest.raises(ShardUnavailable):
                pool.open("nope", "http", {})
        nursery.cancel_scope.cancel()


async def test_pool_body_exception_is_not_wrapped() -> None:
    shard = FakeShard("s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        with pytest.raises(KeyError):
            async with make_pool(shard) as pool:
                await pool.wait_connected()
                raise KeyError("boom")
        nursery.cancel_scope.cancel()


async def test_hung_shard_detected_by_heartbeat() -> None:
    async with connected_pool(forever, heartbeat=(0.1, 0.3)) as (shard, pool):
        await trio.sleep(0.3)
        assert pool.connected("s1")  # pings answered: stays up while idle
        shard.frozen = True  # from now on nothing is answered
        started = trio.current_time()
        with trio.fail_after(3), pytest.raises(ShardUnavailable) as info:
            async with pool.open("s1", "http", {"m": "GET", "p": "a", "q": "", "h": []}) as call:
                await call.response()
        assert info.value.sent
        assert trio.current_time() - started < 1.5
        assert not pool.connected("s1")
        shard.frozen = False
        with trio.fail_after(5):
            await pool.wait_connected("s1")


def test_fake_shard_module_imports() -> None:
    """The stand-in shard these tests talk to is importable from tests/support."""
    assert FakeShard("x").shard_id == "x"


async def test_send_routed_with_a_packed_head_delivers_its_answer_to_first() -> None:
    """`send_routed` with a packed head and its body: the shard gets the request's fields
    whole (the head's, and the body given apart: `fields` is not read for it), the
    answer goes to `first` from the reader (once), the call leaves the table of calls,
    and the ids of such requests and of general ones never collide."""
    async with connected_pool(echo_shuffled) as (shard, pool):
        conn = pool.connections["s1"]
        got: list[Any] = []
        sent = []
        for n in range(5):
            fields = {"m": "POST", "p": f"s{n}", "q": "", "h": [["a", "b"]], "b": b""}
            head = wire.pack_http_head("POST", f"s{n}", "", [["a", "b"]])
            routed = pool.send_routed(f"s{n}", "http", fields, got.append, head, b"x%d" % n)
            assert routed is not None and routed[0] is pool.ring
            sent.append(routed[1])
            plain = pool.open("s1", "http", {**fields, "b": b"general"})
            sent.append(plain)
        assert len({call.id for call in sent}) == len(sent)
        with trio.fail_after(5):
            while len(got) < 5:
                await trio.sleep(0.01)
            for call in sent[1::2]:
                assert (await call.response())["b"] == b"general"
        assert sorted(item["b"] for item in got) == [b"x%d" % n for n in range(5)]
        for call in sent[::2]:
            assert call.first is None and call.answered and call._inbox  # left for settle
        assert conn.in_flight == 0
        by_path = {msg["p"]: msg for msg in shard.requests if msg["b"] != b"general"}
        assert by_path["s3"]["h"] == [["a", "b"]] and by_path["s3"]["b"] == b"x3"


async def test_a_late_answer_to_an_abandoned_call_is_dropped() -> None:
    """A call left before its answer is forgotten: its answer, when it comes, goes nowhere
    and the connection serves on."""
    release = trio.Event()

    async def late(msg: dict[str, Any], reply: Reply) -> None:
        with trio.CancelScope(shield=True):  # answers even though cancelled
            await release.wait()
            await answer_204(msg, reply)

    async with connected_pool(late) as (shard, pool):
        got: list[Any] = []
        fields = {"m": "POST", "p": "a", "q": "", "h": [], "b": b"x"}
        head = wire.pack_http_head("POST", "a", "", [])
        routed = pool.send_routed("a", "http", fields, got.append, head)
        assert routed is not None
        call = routed[1]
        with trio.fail_after(5):
            while not shard.requests:
                await trio.sleep(0.01)
        call.first = None
        call.close()
        release.set()
        with trio.fail_after(5):
            await shard.cancel_seen.wait()
            other = pool.open("s1", "http", fields)
            assert (await other.response())["s"] == 204
        assert got == [] and not call._inbox
        assert pool.connected("s1")


async def test_a_second_response_to_one_request_drops_the_connection() -> None:
    """A shard that answers one request twice breaks the protocol: the connection is
    dropped and the request fails (ShardUnavailable), whichever `res` came second."""
    for first_more in (True, False):

        async def twice(msg: dict[str, Any], reply: Reply, more: bool = first_more) -> None:
            await reply({"k": "res", "i": msg["i"], "s": 200, "h": [], "b": b"", "more": more})
            await reply({"k": "res", "i": msg["i"], "s": 200, "h": [], "b": b"", "more": False})

        async with connected_pool(twice, heartbeat=None) as (_shard, pool):
            fields = {"m": "GET", "p": "a", "q": "", "h": [], "b": b""}
            async with pool.open("s1", "http", fields) as call:
                with trio.fail_after(5):
                    res = await call.response()
                    if first_more:
                        assert res["more"]
                        with pytest.raises(ShardUnavailable):
                            async for _ in call.chunks():
                                pass
                        assert not pool.connected("s1")
                    else:  # a second whole answer names a call no longer in flight
                        assert not res["more"]
                        await trio.sleep(0.1)
                        assert pool.connected("s1")


async def test_send_routed_sends_each_path_to_its_owner() -> None:
    """`send_routed` routes by the newest ring, through the owners it remembers too: every
    request reaches the shard that owns its path, a second time as the first."""
    shards = [FakeShard("s1", echo_shuffled), FakeShard("s2", echo_shuffled)]
    async with trio.open_nursery() as nursery:
        for shard in shards:
            await nursery.start(shard.run)
        ring = Ring(7, ("s1", "s2"))
        endpoints = {shard.shard_id: ("127.0.0.1", shard.port) for shard in shards}
        async with ShardPool(endpoints, ring, role="gateway", name="t", secret=TEST_SECRET) as pool:
            await pool.wait_connected()
            got: list[Any] = []
            paths = [f"p{n}" for n in range(40)] * 2
            for path in paths:
                fields = {"m": "POST", "p": path, "q": "", "h": [], "b": b"x"}
                head = wire.pack_http_head("POST", path, "", [])
                assert pool.send_routed(path, "http", fields, got.append, head) is not None
            with trio.fail_after(5):
                while len(got) < len(paths):
                    await trio.sleep(0.01)
            for shard in shards:
                seen = [msg["p"] for msg in shard.requests]
                assert seen and all(ring.owner(path) == shard.shard_id for path in seen)
            assert sum(len(shard.requests) for shard in shards) == len(paths)
        nursery.cancel_scope.cancel()
