"""Reads a shard answers on the spot (RpcServer._read_now, ShardService.read_now): the
same answers as the full path, and no more unsent answers than the connection allows."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio
from support.cluster import running_cluster

OCTETS = {"content-type": "application/octet-stream"}


async def test_many_large_reads_at_once_all_answered_in_full(tmp_path: Path) -> None:
    # 48 reads of 1 MiB at once come to the shard over the gateway's one connection:
    # answered on the spot without a bound, they would exceed the connection's reply
    # budget (32 MiB) and cost it; the reads beyond HIGH_WATER wait their turn instead.
    body = os.urandom(1 << 20)
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(
            base_url=f"{cluster.url}/v1/stream/",
            timeout=120,
            limits=httpx.Limits(max_connections=64),
        ) as client,
    ):
        assert (await client.put("big", headers=OCTETS)).status_code == 201
        assert (await client.post("big", content=body, headers=OCTETS)).status_code == 204
        results: list[httpx.Response] = []

        async def read() -> None:
            results.append(await client.get("big", params={"offset": "-1"}))

        for _ in range(3):
            results.clear()
            async with trio.open_nursery() as nursery:
                for _ in range(48):
                    nursery.start_soon(read)
            assert [r.status_code for r in results] == [200] * 48
            assert all(r.content == body for r in results)
        # the shard's connection survived: a small request still goes
        head = await client.head("big")
        assert head.status_code == 200
        assert head.headers["stream-next-offset"].endswith(f"{len(body):016d}")


async def test_reads_on_the_spot_match_the_protocol(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        assert (await client.get("absent")).status_code == 404
        assert (await client.head("absent")).status_code == 404
        assert (await client.put("s", headers=OCTETS)).status_code == 201
        empty = await client.get("s", params={"offset": "-1"})
        assert empty.status_code == 200 and empty.content == b""
        assert empty.headers["stream-up-to-date"] == "true"
        for n in range(5):
            r = await client.post("s", content=b"%d" % n, headers=OCTETS)
            assert r.status_code == 204
        full = await client.get("s", params={"offset": "-1"})
        assert full.status_code == 200 and full.content == b"01234"
        tail = full.headers["stream-next-offset"]
        again = await client.get(
            "s", params={"offset": "-1"}, headers={"if-none-match": full.headers["etag"]}
        )
        assert again.status_code == 304
        caught_up = await client.get("s", params={"offset": tail})
        assert caught_up.status_code == 200 and caught_up.content == b""
        now = await client.get("s", params={"offset": "now"})
        assert now.status_code == 200 and now.headers["stream-next-offset"] == tail
        bad = await client.get("s", params={"offset": "nonsense"})
        assert bad.status_code == 400
        # a long-poll with data answers at once; one without waits, then times out or
        # gets the next append (the full path)
        poll = await client.get("s", params={"offset": "-1", "live": "long-poll"})
        assert poll.status_code == 200 and poll.content == b"01234"

        async def append_later() -> None:
            await trio.sleep(0.3)
            await client.post("s", content=b"5", headers=OCTETS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append_later)
            woke = await client.get("s", params={"offset": tail, "live": "long-poll"})
        assert woke.status_code == 200 and woke.content == b"5"
