"""Forks without copies and without size limits, on real clusters.

Covers two findings: a cross-shard fork of a source over 256 MiB failed for good with a
retryable 503, and forks copied their inherited data (10 forks of a 30 MiB stream took
6.9 s and 190 MiB). Forks now read what they inherited from the source, through the
reference they hold on it, so these tests read forks byte-exact at every kind of position
(catch-up, long-poll, SSE, sub-offsets, JSON, forks of forks across shards), check that the
source's data lives exactly as long as a fork needs it, and measure creation.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
from support.cluster import names_on_each_shard, running_cluster
from support.processes import rss

from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import ShardError, ShardPool
from ds_cluster.common.rpc_security import SECRET_FILE_NAME, read_secret_file
from ds_cluster.shard.core.model import ForkOrigin, StreamState
from ds_cluster.shard.peers import PeerUnavailable, records_from_wire
from ds_cluster.shard.store import decode_state, encode_state
from ds_cluster.supervisor.cluster import Supervisor

BINARY = "application/octet-stream"
TEXT = "text/plain"
JSON = "application/json"
MIB = 1024 * 1024


def offset(position: int) -> str:
    return f"{0:016d}_{position:016d}"


def url(name: str) -> str:
    return f"/v1/stream/{name}"


async def create(client: httpx.AsyncClient, name: str, ct: str = BINARY, body=b"", **hdrs):
    headers = {"content-type": ct, **{k.replace("_", "-"): v for k, v in hdrs.items()}}
    r = await client.put(url(name), content=body, headers=headers)
    assert r.status_code == 201, r.text
    return r


async def fork(client: httpx.AsyncClient, name: str, source: str, **hdrs) -> httpx.Response:
    headers = {"stream-forked-from": url(source)}
    headers.update({k.replace("_", "-"): v for k, v in hdrs.items()})
    return await client.put(url(name), headers=headers)


async def append(client: httpx.AsyncClient, name: str, data: bytes, ct: str = BINARY) -> None:
    r = await client.post(url(name), content=data, headers={"content-type": ct})
    assert r.status_code in (200, 204), r.text


async def read_from(client: httpx.AsyncClient, name: str, start: str = "-1") -> bytes:
    """Catch-up read from `start`, following Stream-Next-Offset until up to date."""
    body, at = b"", start
    for _ in range(10_000):
        r = await client.get(url(name), params={"offset": at})
        assert r.status_code == 200, r.text
        body += r.content
        at = r.headers["stream-next-offset"]
        if r.headers.get("stream-up-to-date") == "true":
            return body
    raise AssertionError("never up to date")


async def read_json(client: httpx.AsyncClient, name: str, start: str = "-1") -> list:
    items, at = [], start
    for _ in range(10_000):
        r = await client.get(url(name), params={"offset": at})
        assert r.status_code == 200, r.text
        items += r.json()
        at = r.headers["stream-next-offset"]
        if r.headers.get("stream-up-to-date") == "true":
            return items
    raise AssertionError("never up to date")


async def sse_until_up_to_date(client: httpx.AsyncClient, name: str, start: str) -> list[bytes]:
    """The payloads of an SSE read from `start` up to its first up-to-date control event
    (base64 payloads decoded)."""
    payloads: list[bytes] = []
    params = {"offset": start, "live": "sse"}
    with trio.fail_after(30):
        async with client.stream("GET", url(name), params=params) as r:
            assert r.status_code == 200
            encoded = r.headers.get("stream-sse-data-encoding") == "base64"
            event, data = None, []
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event, data = line[6:].strip(), []
                elif line.startswith("data:"):
                    data.append(line[5:])
                elif line == "" and event is not None:
                    text = "\n".join(data)
                    if event == "data":
                        payloads.append(base64.b64decode(text) if encoded else text.encode())
                    elif event == "control" and json.loads(text).get("upToDate"):
                        return payloads
                    event = None
    raise AssertionError("SSE ended before it was up to date")


def pattern(start: int, size: int) -> bytes:
    """Stream bytes for positions [start, start + size): a prime-length random cycle, so
    any misplaced byte range shows."""
    base = random.Random(7).randbytes(4093)
    skip = start % len(base)
    reps = (skip + size) // len(base) + 1
    return (base * reps)[skip : skip + size]


# ---------------------------------------------------------------------------------------
# Byte-exact reads across the divergence point


@pytest.mark.parametrize("cluster", [3], indirect=True)
async def test_forks_read_byte_exact_across_and_within_shards(cluster: Supervisor) -> None:
    src = names_on_each_shard(cluster, "src")["shard-0"]
    forks = names_on_each_shard(cluster, "fk")
    cross, same = forks["shard-1"], forks["shard-0"]
    sizes = [5, 100_000, 7, 2_000_000, 3]  # one record larger than a read chunk (1 MiB)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        await create(client, src)
        data = b""
        for size in sizes:
            chunk = pattern(len(data), size)
            await append(client, src, chunk)
            data += chunk
        anchor = 5 + 100_000 + 7  # start of the 2 MB record
        r = await fork(
            client, cross, src, stream_fork_offset=offset(anchor), stream_fork_sub_offset="1000"
        )
        assert r.status_code == 201, r.text
        divergence = anchor + 1000
        assert r.headers["stream-next-offset"] == offset(divergence)
        assert (await fork(client, same, src)).status_code == 201
        # Later source appends are not the forks' business; the forks' own appends are.
        await append(client, src, b"SOURCE-LATER")
        await append(client, cross, b"cross-own-1")
        await append(client, cross, b"cross-own-2")
        await append(client, same, b"same-own")
        want_cross = data[:divergence] + b"cross-own-1cross-own-2"
        want_same = data + b"same-own"
        assert await read_from(client, cross) == want_cross
        assert await read_from(client, same) == want_same

        # Every kind of start: record edges, inside records, the divergence point, own data.
        for at in (0, 3, 5, 6, 100_004, anchor, anchor + 1, divergence - 1, divergence,
                   divergence + 4, len(want_cross)):  # fmt: skip
            assert await read_from(client, cross, offset(at)) == want_cross[at:], at
        for at in (0, len(data) - 1, len(data), len(want_same) - 1):
            assert await read_from(client, same, offset(at)) == want_same[at:], at

        # Long-poll: below the divergence point it answers at once with inherited data...
        r = await client.get(
            url(cross), params={"offset": offset(divergence - 10), "live": "long-poll"}
        )
        assert r.status_code == 200 and want_cross[divergence - 10 :].startswith(r.content)
        assert len(r.content) >= 10
        # ... and at the tail it waits for the fork's own next append.
        tail = len(want_cross)
        async with trio.open_nursery() as nursery:

            async def late_append() -> None:
                await trio.sleep(0.3)
                await append(client, cross, b"woken")

            nursery.start_soon(late_append)
            r = await client.get(url(cross), params={"offset": offset(tail), "live": "long-poll"})
        assert r.status_code == 200 and r.content == b"woken"
        want_cross += b"woken"

        # SSE from inside the inherited range to the fork's tail.
        start = divergence - 50
        got = b"".join(await sse_until_up_to_date(client, cross, offset(start)))
        assert got == want_cross[start:]
        # (Far enough in that no frame passes the gateway's 1 MiB per-client SSE budget.)
        start = len(data) - 600_000
        got = b"".join(await sse_until_up_to_date(client, same, offset(start)))
        assert got == want_same[start:]


async def test_json_forks_clip_at_a_message_boundary(cluster: Supervisor) -> None:
    src, cross = names_on_each_shard(cluster, "json").values()
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        await create(client, src, JSON)
        await append(client, src, b"[1, 2, 3]", JSON)
        await append(client, src, b'[{"a": "x,y"}]', JSON)
        await append(client, src, b'["s1", "s2", "s3", "s4"]', JSON)
        r = await fork(
            client,
            cross,
            src,
            content_type=JSON,
            stream_fork_offset=offset(4),
            stream_fork_sub_offset="2",
        )
        assert r.status_code == 201, r.text
        assert r.headers["stream-next-offset"] == offset(6)
        await append(client, src, b'["later"]', JSON)
        await append(client, cross, b'["own"]', JSON)
        want = [1, 2, 3, {"a": "x,y"}, "s1", "s2", "own"]
        assert await read_json(client, cross) == want
        for at in range(len(want) + 1):
            assert await read_json(client, cross, offset(at)) == want[at:], at
        events = await sse_until_up_to_date(client, cross, offset(1))
        assert [item for e in events for item in json.loads(e)] == want[1:]


@pytest.mark.parametrize("cluster", [3], indirect=True)
async def test_fork_of_a_fork_across_three_shards(cluster: Supervisor) -> None:
    names = names_on_each_shard(cluster, "chain")
    a, b, c = names["shard-0"], names["shard-1"], names["shard-2"]
    d = names_on_each_shard(cluster, "chain-d")["shard-0"]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        await create(client, a, TEXT, b"0123456789")
        await append(client, a, b"abcdefghij", TEXT)
        # b inherits a[:13] (a sub-offset into a's second record), then its own data.
        r = await fork(client, b, a, stream_fork_offset=offset(10), stream_fork_sub_offset="3")
        assert r.status_code == 201, r.text
        await append(client, b, b"BBBB", TEXT)
        # c forks b inside b's inherited range: its anchor record lives on a's shard.
        r = await fork(client, c, b, stream_fork_offset=offset(10), stream_fork_sub_offset="2")
        assert r.status_code == 201, r.text
        await append(client, c, b"CC", TEXT)
        r = await fork(client, d, c)  # at c's tail: a's, then c's own data
        assert r.status_code == 201, r.text
        await append(client, d, b"D", TEXT)
        await append(client, a, b"late-a", TEXT)
        await append(client, b, b"late-b", TEXT)
        assert await read_from(client, a) == b"0123456789abcdefghijlate-a"
        assert await read_from(client, b) == b"0123456789abcBBBBlate-b"
        assert await read_from(client, c) == b"0123456789abCC"
        assert await read_from(client, d) == b"0123456789abCCD"
        # One read gathers every level's part while the chunk budget lasts.
        for name, want in ((c, b"0123456789abCC"), (d, b"0123456789abCCD")):
            r = await client.get(url(name), params={"offset": "-1"})
            assert r.content == want and r.headers["stream-up-to-date"] == "true"
        for at in range(15):
            assert await read_from(client, d, offset(at)) == b"0123456789abCCD"[at:], at
        # A sub-offset past the anchor record's end is still refused through the chain.
        r = await fork(
            client, "chain-bad", b, stream_fork_offset=offset(10), stream_fork_sub_offset="4"
        )
        assert r.status_code == 400, r.text


# ---------------------------------------------------------------------------------------
# The source's data lives while forks read it


@pytest.mark.parametrize("cluster", [3], indirect=True)
async def test_soft_deleted_source_stays_readable_through_its_forks_until_the_last_goes(
    cluster: Supervisor,
) -> None:
    src = names_on_each_shard(cluster, "gone")["shard-0"]
    forks = names_on_each_shard(cluster, "gone-f")
    remote, local = forks["shard-1"], forks["shard-0"]
    data = pattern(0, 300_000)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        await create(client, src, BINARY, data)
        assert (await fork(client, remote, src)).status_code == 201
        assert (await fork(client, local, src, stream_fork_offset=offset(1000))).status_code == 201
        assert (await client.delete(url(src))).status_code == 204
        assert (await client.head(url(src))).status_code == 410
        assert (await client.get(url(src), params={"offset": "-1"})).status_code == 410
        assert (await client.put(url(src), headers={"content-type": BINARY})).status_code == 409
        assert await read_from(client, remote) == data
        assert await read_from(client, local) == data[:1000]
        assert (await client.delete(url(remote))).status_code == 204
        assert (await client.head(url(src))).status_code == 410
        assert await read_from(client, local) == data[:1000]
        assert await read_from(client, local, offset(999)) == data[999:1000]
        assert (await client.delete(url(local))).status_code == 204
        with trio.fail_after(20):  # the release travels through the outbox
            while (await client.head(url(src))).status_code != 404:
                await trio.sleep(0.05)
        assert (await client.put(url(src), headers={"content-type": BINARY})).status_code == 201
        assert await read_from(client, src) == b""


async def test_expired_source_stays_readable_through_its_fork(cluster: Supervisor) -> None:
    src, f = names_on_each_shard(cluster, "ttl").values()
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        await create(client, src, TEXT, b"short-lived", stream_ttl="1")
        assert (await fork(client, f, src, stream_ttl="3600")).status_code == 201
        await trio.sleep(1.6)  # past the source's TTL (the expiry alarm soft-deletes it)
        assert (await client.head(url(src))).status_code == 410
        assert await read_from(client, f) == b"short-lived"
        assert (await client.delete(url(f))).status_code == 204
        with trio.fail_after(20):
            while (await client.head(url(src))).status_code != 404:
                await trio.sleep(0.05)


# ---------------------------------------------------------------------------------------
# Size and cost


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("shard.db*"))


async def test_ten_forks_of_a_30_mib_stream_copy_nothing(cluster: Supervisor) -> None:
    src = names_on_each_shard(cluster, "big30")["shard-0"]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
        await create(client, src)
        for i in range(3):
            await append(client, src, pattern(i * 10 * MIB, 10 * MIB))
        pids = cluster.child_pids()

        def disk() -> int:
            return sum(disk_bytes(cluster.data_dir / sid) for sid in cluster.shard_ids)

        def shards_rss() -> int:
            return sum(rss(pids[sid]) for sid in cluster.shard_ids)

        disk_before, rss_before = disk(), shards_rss()
        # Ten names, five on each shard: same-shard and cross-shard forks.
        names = [n for i in range(5) for n in names_on_each_shard(cluster, f"big30-{i}").values()]
        started = time.perf_counter()
        for name in names:
            r = await fork(client, name, src)
            assert r.status_code == 201, r.text
        took = time.perf_counter() - started
        disk_growth = disk() - disk_before
        rss_growth = shards_rss() - rss_before
        print(
            f"10 forks of a 30 MiB stream: {took:.3f} s, shards' disk +{disk_growth} B, "
            f"shards' RSS +{rss_growth / MIB:.1f} MiB"
        )
        # Copying took 6.9 s and 190 MiB; generous bounds for a shared 2-core machine.
        assert took < 3.0
        assert disk_growth < 2 * MIB
        assert rss_growth < 20 * MIB
        for name in (names[0], names[-1]):
            r = await client.get(url(name), params={"offset": offset(25 * MIB)})
            assert r.status_code == 200 and r.content == pattern(25 * MIB, len(r.content))


async def test_cross_shard_fork_of_a_source_over_256_mib(cluster: Supervisor) -> None:
    src, f = names_on_each_shard(cluster, "huge").values()
    piece = 56 * MIB
    total = 5 * piece  # 280 MiB, more than one RPC frame may carry
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
        await create(client, src)
        for i in range(5):
            await append(client, src, pattern(i * piece, piece))
        started = time.perf_counter()
        r = await fork(client, f, src)
        took = time.perf_counter() - started
        assert r.status_code == 201, r.text
        assert r.headers["stream-next-offset"] == offset(total)
        print(f"cross-shard fork of a {total // MIB} MiB source: {took * 1000:.1f} ms")
        assert took < 2.0
        await append(client, f, b"own")
        for at in (0, 100 * MIB + 13, 256 * MIB + 5, total - 7):
            r = await client.get(url(f), params={"offset": offset(at)})
            assert r.status_code == 200, r.text
            inherited = min(len(r.content), total - at)
            assert r.content[:inherited] == pattern(at, inherited), at
            assert r.content[inherited:] == b"own"[: len(r.content) - inherited], at
            assert int(r.headers["stream-next-offset"].split("_")[1]) == at + len(r.content)
        assert await read_from(client, f, offset(total - 7)) == pattern(total - 7, 7) + b"own"


# ---------------------------------------------------------------------------------------
# Failures


async def test_fork_read_answers_503_while_its_source_shard_is_down_and_recovers(
    cluster: Supervisor,
) -> None:
    names = names_on_each_shard(cluster, "down")
    src, f = names["shard-0"], names["shard-1"]
    source_shard = "shard-0"
    data = pattern(0, 50_000)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
        await create(client, src, BINARY, data)
        assert (await fork(client, f, src)).status_code == 201
        await append(client, f, b"own data")
        assert await read_from(client, f) == data + b"own data"
        pid = cluster.child_pids()[source_shard]
        os.kill(pid, signal.SIGSTOP)
        try:
            # Inherited positions need the source: 503 with Retry-After, never a gap.
            with trio.fail_after(40):
                while True:
                    r = await client.get(url(f), params={"offset": offset(10)})
                    if r.status_code == 503:
                        break
                    assert r.status_code == 200 and r.content == data[10 : 10 + len(r.content)]
            assert "retry-after" in r.headers
            assert "stream-next-offset" not in r.headers
            # Live reads too: the SSE head waits for the first read, so it can be a 503.
            for live in ("long-poll", "sse"):
                r = await client.get(url(f), params={"offset": offset(10), "live": live})
                assert r.status_code == 503, (live, r.status_code, r.content[:200])
            # The fork's own data does not need the source.
            r = await client.get(url(f), params={"offset": offset(len(data))})
            assert r.status_code == 200 and r.content == b"own data"
        finally:
            os.kill(pid, signal.SIGCONT)
        with trio.fail_after(40):
            while (await client.get(url(f), params={"offset": offset(10)})).status_code != 200:
                await trio.sleep(0.2)
        assert await read_from(client, f) == data + b"own data"


async def test_read_fork_is_served_only_for_a_reference_held_on_that_source(
    cluster: Supervisor,
) -> None:
    names = names_on_each_shard(cluster, "cap")
    src, other = names["shard-0"], names["shard-1"]
    source_shard = "shard-0"
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        await create(client, src, TEXT, b"secret data")
    secret = read_secret_file(cluster.data_dir / SECRET_FILE_NAME)
    endpoints = {sid: ("127.0.0.1", port) for sid, (_, port) in cluster.shard_addresses.items()}
    ring = Ring(1, tuple(cluster.shard_ids))
    async with ShardPool(endpoints, ring, role="shard", name="test", secret=secret) as pool:
        with trio.fail_after(10):
            await pool.wait_connected()
        args = {"source": src, "ref": "0" * 32, "position": 0, "limit": 100, "max_bytes": 100}
        with pytest.raises(ShardError) as err:
            await pool.call(source_shard, "read_fork", args, timeout=10)
        assert err.value.code == "bad_request"
        with pytest.raises(ShardError) as err:
            await pool.call(source_shard, "read_fork", {**args, "position": "0"}, timeout=10)
        assert err.value.code == "bad_request"
        with pytest.raises(ShardError) as err:
            await pool.call(source_shard, "read_fork", {**args, "source": other}, timeout=10)
        assert err.value.code == "misdirected"


# ---------------------------------------------------------------------------------------
# Forks made by the copying code keep working


def legacy_state_blob(state: StreamState) -> bytes:
    """`state` in the layout the copying code wrote: a 5-item fork origin."""
    fields = msgpack.unpackb(encode_state(state), raw=False)
    fields[11] = fields[11][:5]
    return msgpack.packb(fields, use_bin_type=True)


def test_fork_origin_layouts_decode() -> None:
    origin = ForkOrigin("src", offset(5), 2, 7, "ref", linked=True)
    state = StreamState(path="f", content_type=TEXT, created_at=1.0, tail=9, fork=origin)
    assert decode_state("f", encode_state(state), {}).fork == origin
    legacy = decode_state("f", legacy_state_blob(state), {})
    assert legacy.fork == ForkOrigin("src", offset(5), 2, 7, "ref", linked=False)


async def test_forks_made_by_the_copying_code_keep_reading(tmp_path: Path) -> None:
    """A fork whose inherited records were copied into its own shard (and whose origin has
    the old 5-item layout) reads its copy, also after its source is deleted."""
    async with running_cluster(tmp_path, shards=2) as cluster:
        names = names_on_each_shard(cluster, "legacy")
        src, f = names["shard-0"], names["shard-1"]
        fork_shard = "shard-1"
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            await create(client, src, TEXT, b"inherited-")
            await append(client, src, b"data", TEXT)
            assert (await fork(client, f, src, stream_fork_sub_offset="0")).status_code == 201
            await append(client, f, b"+own", TEXT)
    # Rewrite the fork as the copying code stored it: old origin layout, copied records.
    db = sqlite3.connect(tmp_path / "data" / fork_shard / "shard.db")
    with db:
        sid, blob = db.execute("SELECT sid, state FROM streams WHERE path = ?", (f,)).fetchone()
        state = decode_state(f, blob, {})
        assert state.fork is not None and state.fork.linked
        db.execute("UPDATE streams SET state = ? WHERE sid = ?", (legacy_state_blob(state), sid))
        db.execute(
            "INSERT INTO records (sid, end_pos, start_pos, data) VALUES (?, 14, 0, ?)",
            (sid, b"inherited-data"),
        )
    db.close()
    async with (
        running_cluster(tmp_path, shards=2) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
    ):
        assert await read_from(client, f) == b"inherited-data+own"
        assert (await client.delete(url(src))).status_code == 204
        assert await read_from(client, f) == b"inherited-data+own"
        assert await read_from(client, f, offset(3)) == b"erited-data+own"
        assert (await client.delete(url(f))).status_code == 204
        with trio.fail_after(20):
            while (await client.head(url(src))).status_code != 404:
                await trio.sleep(0.05)


@pytest.mark.parametrize("cluster", [1], indirect=True)
async def test_a_long_fork_chain_on_one_shard_reads_without_recursion(cluster: Supervisor) -> None:
    depth = 400
    names = [f"deep-{i}-{random.randrange(1 << 30)}" for i in range(depth + 1)]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        await create(client, names[0], TEXT, b"0")
        for level in range(1, depth + 1):
            r = await client.put(
                url(names[level]),
                content=str(level % 10).encode(),
                headers={"stream-forked-from": url(names[level - 1]), "content-type": TEXT},
            )
            assert r.status_code == 201, r.text
        want = "".join(str(i % 10) for i in range(depth + 1)).encode()
        assert await read_from(client, names[-1]) == want
        r = await client.get(url(names[-1]), params={"offset": "-1"})
        assert r.content == want and r.headers["stream-up-to-date"] == "true"
        assert await read_from(client, names[-1], offset(depth - 3)) == want[depth - 3 :]


def test_a_malformed_read_fork_answer_is_the_peer_failing_never_data() -> None:
    good = {"records": [[0, 3, b"abc"], [3, 5, b"de"]]}
    assert [r.data for r in records_from_wire(good)] == [b"abc", b"de"]
    for bad in (
        {},
        {"records": "abc"},
        {"records": [[0, 3]]},
        {"records": [[0, 3, "abc"]]},
        {"records": [[3, 3, b""]]},  # empty range
        {"records": [[3, 5, b"de"], [0, 3, b"abc"]]},  # out of order
        {"records": [[True, 3, b"abc"]]},
    ):
        with pytest.raises(PeerUnavailable):
            records_from_wire(bad)
