"""The shard's cache of slices read from disk (shard/slice_cache.py) never serves stale
data: after a delete, an expiry, a re-creation at the same path (also with the stream id
the deleted incarnation had, after a restart), a tail that moved, and for forks reading
their source's data. Streams here are larger than what a shard keeps of a stream's tail in
memory (`streams.RECENT_BYTES`), so their reads from the start go to disk and the cache."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio
from support.cluster import names_on_each_shard, running_cluster

from ds_cluster.shard.core.model import Record
from ds_cluster.shard.slice_cache import MIN_SLICE_BYTES, SliceCache
from ds_cluster.shard.streams import RECENT_BYTES

OCTETS = {"content-type": "application/octet-stream"}
PIECE = 64 * 1024
PIECES = RECENT_BYTES // PIECE + 2  # the first pieces are on disk only


async def write(client: httpx.AsyncClient, name: str, pieces: list[bytes], **headers: str) -> None:
    r = await client.put(name, headers={**OCTETS, **headers})
    assert r.status_code == 201, r.text
    for piece in pieces:
        r = await client.post(name, content=piece, headers=OCTETS)
        assert r.status_code == 204, r.text


async def read_all(client: httpx.AsyncClient, name: str) -> bytes:
    """A catch-up from the start, following Stream-Next-Offset until up to date."""
    body, at = b"", "-1"
    for _ in range(100):
        r = await client.get(name, params={"offset": at})
        assert r.status_code == 200, r.text
        body += r.content
        if r.headers.get("stream-up-to-date") == "true":
            return body
        at = r.headers["stream-next-offset"]
    raise AssertionError("never up to date")


def pieces(count: int = PIECES) -> list[bytes]:
    return [os.urandom(PIECE) for _ in range(count)]


async def test_a_deleted_and_recreated_stream_reads_its_new_data(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        old = pieces()
        await write(client, "s", old)
        for _ in range(2):  # from disk, then from the cache
            assert await read_all(client, "s") == b"".join(old)
        assert (await client.delete("s")).status_code == 204
        assert (await client.get("s", params={"offset": "-1"})).status_code == 404
        new = pieces()  # the same size: the same positions, other bytes
        await write(client, "s", new)
        for _ in range(2):
            assert await read_all(client, "s") == b"".join(new)


async def test_a_stream_recreated_with_its_old_stream_id_reads_its_new_data(
    tmp_path: Path,
) -> None:
    # The stream with the highest id deleted in a fresh process: the next stream created
    # there gets the same id (ids continue from the highest one stored).
    old, new = pieces(), pieces()
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        await write(client, "s", old)
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        assert await read_all(client, "s") == b"".join(old)
        assert (await client.delete("s")).status_code == 204
        await write(client, "s", new)
        assert await read_all(client, "s") == b"".join(new)


async def test_a_read_cut_by_the_tail_sees_what_was_appended_since(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        data = pieces()
        await write(client, "s", data)
        assert await read_all(client, "s") == b"".join(data)
        for _ in range(3):
            more = os.urandom(PIECE)
            r = await client.post("s", content=more, headers=OCTETS)
            assert r.status_code == 204
            data.append(more)
            assert await read_all(client, "s") == b"".join(data)


async def test_an_expired_stream_is_gone_and_its_successor_reads_new_data(
    tmp_path: Path,
) -> None:
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        old = pieces()
        await write(client, "s", old, **{"stream-ttl": "1"})
        assert await read_all(client, "s") == b"".join(old)
        await trio.sleep(1.6)  # past the TTL (reads renew it: nothing reads meanwhile)
        assert (await client.get("s", params={"offset": "-1"})).status_code == 404
        new = pieces()
        await write(client, "s", new)
        assert await read_all(client, "s") == b"".join(new)


async def test_forks_read_their_sources_data_through_the_cache(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=2) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        src, remote = names_on_each_shard(cluster, "src").values()
        local = next(n for n in names_on_each_shard(cluster, "f").values())
        data = pieces()
        await write(client, src, data)
        assert await read_all(client, src) == b"".join(data)  # now in the cache
        for name in (local, remote):
            r = await client.put(name, headers={"stream-forked-from": f"/v1/stream/{src}"})
            assert r.status_code == 201, r.text
            own = os.urandom(PIECE)
            assert (await client.post(name, content=own, headers=OCTETS)).status_code == 204
            assert await read_all(client, name) == b"".join(data) + own
        # the source deleted: its data lives on for the forks
        assert (await client.delete(src)).status_code == 204
        assert (await client.get(src, params={"offset": "-1"})).status_code in (404, 410)
        for name in (local, remote):
            assert (await read_all(client, name)).startswith(b"".join(data))
            assert (await client.delete(name)).status_code == 204
        # ... until no fork needs it; then the path takes a new stream
        with trio.fail_after(20):
            while (await client.head(src)).status_code != 404:
                await trio.sleep(0.05)
        new = pieces()
        await write(client, src, new)
        assert await read_all(client, src) == b"".join(new)


def test_the_cache_keeps_its_budget_and_serves_a_tail_cut_slice_only_below_that_tail() -> None:
    cache = SliceCache(budget=3 * MIN_SLICE_BYTES)
    whole = Record(0, 2 * MIN_SLICE_BYTES, b"x" * (2 * MIN_SLICE_BYTES))
    cut = Record(0, MIN_SLICE_BYTES, b"y" * MIN_SLICE_BYTES)
    cache.put((1, 1, 0, 2 * MIN_SLICE_BYTES), 10 * MIN_SLICE_BYTES, whole)  # cut by size
    cache.put((1, 2, 0, 4 * MIN_SLICE_BYTES), MIN_SLICE_BYTES, cut)  # cut by the tail
    assert cache.get((1, 1, 0, 2 * MIN_SLICE_BYTES), 11 * MIN_SLICE_BYTES) is whole
    assert cache.get((1, 2, 0, 4 * MIN_SLICE_BYTES), MIN_SLICE_BYTES) is cut
    assert cache.get((1, 2, 0, 4 * MIN_SLICE_BYTES), 2 * MIN_SLICE_BYTES) is None
    assert cache.get((2, 1, 0, 2 * MIN_SLICE_BYTES), 11 * MIN_SLICE_BYTES) is None
    small = Record(0, 10, b"z" * 10)
    cache.put((1, 3, 0, 100), 10, small)
    assert cache.get((1, 3, 0, 100), 10) is None  # too small to be worth keeping
    cache.put((1, 4, 0, 2 * MIN_SLICE_BYTES), 10 * MIN_SLICE_BYTES, whole)
    assert cache.held_bytes <= 3 * MIN_SLICE_BYTES
    assert cache.get((1, 1, 0, 2 * MIN_SLICE_BYTES), 11 * MIN_SLICE_BYTES) is None  # oldest out
