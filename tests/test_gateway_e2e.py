"""The gateway in front of real shard processes (via the supervisor): routing over the
ring, transport headers on real answers, cross-shard forks, long-poll and SSE relaying."""

from __future__ import annotations

import uuid

import httpx
import pytest
import trio
from support.cluster import names_on_each_shard

from ds_cluster.supervisor.cluster import Supervisor

pytestmark = pytest.mark.parametrize("cluster", [2], indirect=True)


def assert_transport(headers: httpx.Headers) -> None:
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cross-origin-resource-policy"] == "cross-origin"
    assert headers.get_list("access-control-allow-origin") == ["*"]
    assert "stream-next-offset" in headers["access-control-expose-headers"].lower()


async def test_every_shard_reached_with_transport_headers(cluster: Supervisor) -> None:
    async with httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=10) as client:
        for name in names_on_each_shard(cluster, "e2e-route").values():
            created = await client.put(name, headers={"Content-Type": "text/plain"})
            assert created.status_code == 201
            assert_transport(created.headers)
            appended = await client.post(
                name, headers={"Content-Type": "text/plain"}, content=b"hello"
            )
            assert appended.status_code in (200, 204)
            assert_transport(appended.headers)
            read = await client.get(name, params={"offset": "-1"})
            assert read.status_code == 200 and read.content == b"hello"
            assert_transport(read.headers)
            head = await client.head(name)
            assert head.status_code == 200
            assert "no-store" in head.headers["cache-control"]
            assert head.headers["stream-next-offset"] == read.headers["stream-next-offset"]
            missing = await client.get(f"{name}-missing")
            assert missing.status_code == 404
            assert_transport(missing.headers)


async def test_fork_across_shards(cluster: Supervisor) -> None:
    names = list(names_on_each_shard(cluster, "e2e-fork").values())
    source, fork = names[0], names[1]  # owned by different shards
    async with httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=10) as client:
        await client.put(source, headers={"Content-Type": "text/plain"}, content=b"abc")
        created = await client.put(
            fork,
            headers={"Content-Type": "text/plain", "Stream-Forked-From": f"/v1/stream/{source}"},
        )
        assert created.status_code == 201, created.text
        await client.post(fork, headers={"Content-Type": "text/plain"}, content=b"def")
        read = await client.get(fork, params={"offset": "-1"})
        assert read.content == b"abcdef"


async def test_long_poll_and_sse_relay(cluster: Supervisor) -> None:
    name = f"e2e-live-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=20) as client:
        created = await client.put(name, headers={"Content-Type": "text/plain"})
        tail = created.headers["stream-next-offset"]
        results: dict[str, httpx.Response] = {}

        async def long_poll() -> None:
            results["poll"] = await client.get(name, params={"offset": tail, "live": "long-poll"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.sleep(0.3)  # the long-poll is waiting on the shard
            await client.post(name, headers={"Content-Type": "text/plain"}, content=b"live!")
        assert results["poll"].status_code == 200
        assert results["poll"].content == b"live!"
        assert_transport(results["poll"].headers)

        seen = b""
        with trio.fail_after(10):
            async with client.stream(
                "GET", name, params={"offset": "-1", "live": "sse"}
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                assert "content-length" not in response.headers
                assert_transport(response.headers)
                async for chunk in response.aiter_raw():
                    seen += chunk
                    if b"live!" in seen:
                        break  # hang up mid-stream; the gateway cancels on the shard
        assert b"live!" in seen
        # the gateway is unharmed and still routes
        assert (await client.get(name, params={"offset": "-1"})).content == b"live!"
