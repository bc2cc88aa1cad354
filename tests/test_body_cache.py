"""Large catch-up bodies that do not cross the shard link twice: a shard names a raw slice
with a body token (shard/slice_cache.py), the gateway keeps the body (gateway/body_cache.py)
and sends the token back; the shard decides as always and leaves the body out only when
it is that very one (common/wire.py's `t` and `hit`).

Real processes: a gateway and a shard under the supervisor, or a shard spoken to over its
RPC port; reads whose bodies must be the stream's bytes, never a stale body, after an
append, a delete and re-creation, an expiry and a restart. The pure pieces (the token, the
gateway's cache) are tested at the end."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from support.auth import open_authenticated, secret_args
from support.cluster import running_cluster
from support.processes import ShardProcess

from ds_cluster.common import wire
from ds_cluster.gateway.body_cache import MAX_SHARE, BodyCache
from ds_cluster.shard.committer import Committer, Job
from ds_cluster.shard.core.model import Record, StreamState
from ds_cluster.shard.slice_cache import TOKEN_BYTES, body_token
from ds_cluster.shard.store import Store, StreamWrite
from ds_cluster.shard.streams import RECENT_BYTES, StreamTable

OCTETS = {"content-type": "application/octet-stream"}
PIECE = 64 * 1024
PIECES = RECENT_BYTES // PIECE + 16  # over 1 MiB: the first read from the start is disk's
# What a client of either read must see alike (the rest: request ids, dates).
SAME = ("content-type", "content-length", "etag", "cache-control", "stream-next-offset")


async def write(client: httpx.AsyncClient, name: str, count: int, **headers: str) -> bytes:
    r = await client.put(name, headers={**OCTETS, **headers})
    assert r.status_code == 201, r.text
    data = [os.urandom(PIECE) for _ in range(count)]
    for piece in data:
        r = await client.post(name, content=piece, headers=OCTETS)
        assert r.status_code == 204, r.text
    return b"".join(data)


async def read_all(client: httpx.AsyncClient, name: str) -> tuple[bytes, list[httpx.Response]]:
    """A catch-up from the start, following Stream-Next-Offset until up to date."""
    body, at, answers = b"", "-1", []
    for _ in range(100):
        r = await client.get(name, params={"offset": at})
        assert r.status_code == 200, r.text
        assert int(r.headers["content-length"]) == len(r.content)
        answers.append(r)
        body += r.content
        if r.headers.get("stream-up-to-date") == "true":
            return body, answers
        at = r.headers["stream-next-offset"]
    raise AssertionError("never up to date")


async def counts(client: httpx.AsyncClient) -> dict[str, float]:
    """The gateway's body cache figures and the shards' unsent bytes, from /metrics."""
    text = (await client.get("/metrics")).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("ds_body_cache", "ds_read_bytes")):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def test_a_hot_body_crosses_the_link_once_and_never_stale(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as admin,
    ):
        data = await write(client, "s", PIECES)
        first, answers = await read_all(client, "s")
        assert first == data
        before = await counts(admin)
        assert before["ds_body_cache_bytes"] >= 1024 * 1024  # the first 1 MiB slice at least
        again, repeated = await read_all(client, "s")
        assert again == data
        after = await counts(admin)
        for one, other in zip(answers, repeated, strict=True):
            assert [one.headers.get(h) for h in SAME] == [other.headers.get(h) for h in SAME]
        # the large slice came from the gateway's copy: the shard sent its headers only
        hits = after["ds_body_cache_hits_total"] - before["ds_body_cache_hits_total"]
        unsent = after["ds_read_bytes_unsent_total"] - before["ds_read_bytes_unsent_total"]
        assert hits >= 1 and unsent >= 1024 * 1024, (before, after)
        assert after["ds_body_cache_misses_total"] == before["ds_body_cache_misses_total"]
        # the shard still counts what its reads served
        read = after["ds_read_bytes_total"] - before["ds_read_bytes_total"]
        assert read == len(data)

        # an append: the slice cut by the old tail is another body now
        more = os.urandom(PIECE)
        assert (await client.post("s", content=more, headers=OCTETS)).status_code == 204
        data += more
        for _ in range(2):
            assert (await read_all(client, "s"))[0] == data

        # deleted and re-created with as much data (the same positions and lengths); the
        # gateway still holds the old body and sends its token (no GET in between)
        assert (await client.delete("s")).status_code == 204
        assert (await client.head("s")).status_code == 404
        new = await write(client, "s", PIECES + 1)
        misses = (await counts(admin))["ds_body_cache_misses_total"]
        assert (await read_all(client, "s"))[0] == new
        recreated = (await counts(admin))["ds_body_cache_misses_total"]
        assert recreated > misses  # the old token sent, the new body received
        assert (await read_all(client, "s"))[0] == new

        # expired, then created again
        old = await write(client, "t", PIECES, **{"stream-ttl": "1"})
        assert (await read_all(client, "t"))[0] == old
        await trio.sleep(1.6)  # past the TTL (reads renew it: nothing reads meanwhile)
        assert (await client.head("t")).status_code == 404
        fresh = await write(client, "t", PIECES)
        for _ in range(2):
            assert (await read_all(client, "t"))[0] == fresh
        assert (await counts(admin))["ds_body_cache_misses_total"] > recreated
        # a read of a stream gone: the shard's 404, and the body is no longer kept
        held = (await counts(admin))["ds_body_cache_bytes"]
        assert (await client.delete("t")).status_code == 204
        assert (await client.get("t", params={"offset": "-1"})).status_code == 404
        assert (await counts(admin))["ds_body_cache_bytes"] == held - (1 << 20)


async def test_a_restarted_shard_names_its_bodies_anew(tmp_path: Path) -> None:
    """The shard's process restarts with the gateway's cache still full: incarnation and
    stream ids restart too, so a stream re-created there repeats them (the same requests
    in the same order, the deleted stream's id reused), and only the process's nonce
    tells its bodies apart."""
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as admin,
    ):
        assert (await client.head("probe")).status_code == 404
        data = await write(client, "s", PIECES)
        assert (await read_all(client, "s"))[0] == data
        assert (await client.delete("s")).status_code == 204
        shard_id = cluster.shard_ids[0]
        pid = cluster.child_pids()[shard_id]
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(30):
            while cluster.child_pids().get(shard_id) in (None, pid):
                await trio.sleep(0.05)
            while (await client.head("probe")).status_code == 503:  # as before "s", below
                await trio.sleep(0.05)
        misses = (await counts(admin))["ds_body_cache_misses_total"]
        new = await write(client, "s", PIECES)  # (its stream id is the deleted one's)
        for _ in range(2):
            assert (await read_all(client, "s"))[0] == new
        after = await counts(admin)
        assert after["ds_body_cache_misses_total"] > misses
        assert after["ds_body_cache_hits_total"] >= 1


# ---- the shard, over its RPC port -----------------------------------------------------


@contextmanager
def shard_process(tmp: Path) -> Iterator[ShardProcess]:
    shard = ShardProcess(tmp, "shard-0", *secret_args(tmp))
    try:
        yield shard
    finally:
        shard.stop()


def http(i: int, method: str, query: str = "", body: bytes = b"", token: bytes = b"") -> Any:
    fields = {"m": method, "p": "s", "q": query, "h": [list(kv) for kv in OCTETS.items()]}
    return {"k": "req", "i": i, "r": 1, "op": "http", **fields, "t": token, "b": body}


async def test_the_shard_leaves_out_only_the_body_the_token_names(tmp_path: Path) -> None:
    with shard_process(tmp_path) as shard:
        stream, _, _ = await open_authenticated(shard.address, "shard-0")
        decoder = wire.FrameDecoder()

        async def call(frame: Any) -> Any:
            await stream.send_all(wire.encode(frame))
            with trio.fail_after(10):
                while True:
                    data = await stream.receive_some(1 << 20)
                    assert data
                    if frames := decoder.feed(data):
                        return frames[0]

        assert (await call(http(1, "PUT")))["s"] == 201
        for n in range(PIECES):
            assert (await call(http(2 + n, "POST", body=os.urandom(PIECE))))["s"] == 204
        whole = await call(http(100, "GET", "offset=-1"))
        token = whole["t"]
        assert len(token) == TOKEN_BYTES and not whole["hit"] and len(whole["b"]) == 1 << 20
        # the token named: no body, the same head
        hit = await call(http(101, "GET", "offset=-1", token=token))
        assert (hit["hit"], hit["b"], hit["t"], hit["h"]) == (True, b"", token, whole["h"])
        # a wrong token (another position, a made-up one): the whole body, as before
        for wrong in (token[:-1] + bytes([token[-1] ^ 1]), b"x" * 64, b"x"):
            miss = await call(http(102, "GET", "offset=-1", token=wrong))
            assert (miss["hit"], miss["b"], miss["t"]) == (False, whole["b"], token)
        # a HEAD, a 304 and a read from another offset never name that body
        assert not (await call(http(103, "HEAD", "offset=-1", token=token)))["hit"]
        etag = dict(whole["h"])["etag"]
        cond = http(104, "GET", "offset=-1", token=token)
        cond["h"].append(["if-none-match", etag])
        answer = await call(cond)
        assert (answer["s"], answer["hit"], answer["t"]) == (304, False, b"")
        nxt = dict(whole["h"])["stream-next-offset"]
        answer = await call(http(105, "GET", f"offset={nxt}", token=token))
        assert not answer["hit"] and answer["t"] != token
        # deleted and re-created with the same data size: another incarnation
        assert (await call(http(106, "DELETE")))["s"] == 204
        assert (await call(http(107, "PUT")))["s"] == 201
        for n in range(PIECES):
            assert (await call(http(108 + n, "POST", body=os.urandom(PIECE))))["s"] == 204
        answer = await call(http(200, "GET", "offset=-1", token=token))
        assert not answer["hit"] and answer["b"] != whole["b"] and answer["t"] != token
        await trio.aclose_forcefully(stream)


# ---- the shard's table over a real store ----------------------------------------------


async def test_a_storage_failure_and_a_reopen_renew_every_token(tmp_path: Path) -> None:
    """What a token names before the storage failed never matches after: while it is
    failed no token is given, and once the database is reopened the tokens are new,
    for the same bytes. A tail that moved past a slice cut by it names a longer one."""
    store = Store(tmp_path)
    table = StreamTable(store)
    table.start_serving()
    committer = Committer(store, lambda jobs: None)
    entry = table.get("s")
    piece = os.urandom(1 << 19)

    async def append(data: bytes) -> None:
        tail = entry.pending.tail if entry.pending else 0
        state = StreamState(
            path="s", content_type="application/octet-stream", created_at=1.0, tail=tail + len(data)
        )
        write = StreamWrite(
            "s", 1, 1 if tail else None, state, (Record(tail, tail + len(data), data),)
        )
        entry.pending = state
        await committer.submit(Job(writes=[(entry, write)])).wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        await append(piece)
        entry.forget()  # (the recent records in memory: read from the disk instead)
        records, first = table.read_named(entry, 0, 1 << 20)
        assert records[0].data == piece and len(first) == TOKEN_BYTES
        assert table.read_named(entry, 0, 1 << 20)[1] == first  # from the slice cache
        store.mark_failed("disk I/O error (a test)")
        records, failed = table.read_named(entry, 0, 1 << 20)
        assert records[0].data == piece and failed == b""
        store.install(store.connect())
        records, reopened = table.read_named(entry, 0, 1 << 20)
        assert records[0].data == piece and len(reopened) == TOKEN_BYTES != 0
        assert reopened != first
        assert table.read_named(entry, 0, 1 << 20)[1] == reopened
        await append(piece)
        entry.forget()
        records, longer = table.read_named(entry, 0, 1 << 20)
        assert records[0].data == piece * 2 and longer not in (first, reopened)
        nursery.cancel_scope.cancel()
    store.close()


# ---- pure pieces ------------------------------------------------------------------------


def test_tokens_differ_in_every_part_they_name() -> None:
    key = (7, 3, 0, 1 << 20)
    token = body_token(1, key, 1 << 20)
    assert len(token) == TOKEN_BYTES <= wire.MAX_TOKEN_BYTES
    assert body_token(1, key, 1 << 20) == token
    others = {
        body_token(2, key, 1 << 20),  # another storage generation
        body_token(1, (8, 3, 0, 1 << 20), 1 << 20),  # another incarnation
        body_token(1, (7, 4, 0, 1 << 20), 1 << 20),  # another stream id
        body_token(1, (7, 3, 1, 1 << 20), 1 << 20),  # another position
        body_token(1, (7, 3, 0, 1 << 19), 1 << 20),  # another size asked for
        body_token(1, key, (1 << 20) - 1),  # another length (the tail cut it)
    }
    assert len(others) == 6 and token not in others


def test_the_gateway_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    mib = 1 << 20
    cache = BodyCache(8 * mib)
    bodies = {n: bytes([n]) * mib for n in range(10)}
    for n, body in bodies.items():
        cache.put(("s", b"offset=%d" % n), b"t%d" % n, body)
        assert cache.held_bytes <= 8 * mib
    assert cache.held_bytes == 8 * mib and len(cache) == 8
    assert cache.get(("s", b"offset=0")) is None  # the oldest went first
    kept = cache.get(("s", b"offset=2"))
    assert kept is not None and kept[0] == b"t2" and kept[1] is bodies[2]  # shared, not copied
    cache.put(("s", b"offset=10"), b"t10", bodies[0])
    assert cache.get(("s", b"offset=2")) is not None  # used lately: kept
    assert cache.get(("s", b"offset=3")) is None
    cache.put(("s", b"offset=2"), b"u2", bodies[1])  # replaced, counted once
    assert cache.held_bytes == 8 * mib and cache.get(("s", b"offset=2")) == (b"u2", bodies[1])
    cache.drop(("s", b"offset=2"))
    assert cache.held_bytes == 7 * mib and cache.get(("s", b"offset=2")) is None
    cache.put(("s", b"big"), b"t", b"x" * (8 * mib // MAX_SHARE + 1))  # too large a share
    cache.put(("s", b"none"), b"", b"x")  # a body without a token
    assert cache.get(("s", b"big")) is None and cache.get(("s", b"none")) is None
    off = BodyCache(0)
    off.put(("s", b""), b"t", b"x")
    assert not off.enabled and off.held_bytes == 0 and len(off) == 0
