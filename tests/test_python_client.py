"""Round trips through the official Python client (`durable-streams` on PyPI).

The synchronous client blocks, so it runs in a worker thread; the asynchronous one runs
on trio directly (it is httpx underneath). Appends use `batching=False` on the async
handle because its batching uses asyncio primitives.
"""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest
import trio
from durable_streams import (
    AsyncDurableStream,
    DurableStream,
    StreamNotFoundError,
    astream,
    stream,
)

from ds_cluster.supervisor.cluster import Supervisor

pytestmark = pytest.mark.parametrize("cluster", [2], indirect=True)


def _url(cluster: Supervisor, name: str) -> str:
    return f"{cluster.url}/v1/stream/py-{name}-{uuid.uuid4().hex[:8]}"


async def test_create_write_read_delete(cluster: Supervisor) -> None:
    url = _url(cluster, "json")

    def scenario() -> None:
        with DurableStream.create(url, content_type="application/json") as handle:
            first = handle.append({"n": 1})
            second = handle.append({"n": 2})
            assert first.next_offset < second.next_offset  # offsets sort lexicographically
            head = handle.head()
            assert head.offset == second.next_offset
            assert head.content_type.startswith("application/json")
            with handle.stream(live=False) as res:
                assert res.read_json() == [{"n": 1}, {"n": 2}]
            with handle.stream(offset=first.next_offset, live=False) as res:
                assert res.read_json() == [{"n": 2}]
            handle.delete()
        with pytest.raises(StreamNotFoundError):
            DurableStream.head_static(url)

    await trio.to_thread.run_sync(scenario)


async def test_bytes_stream_and_concurrent_batched_appends(cluster: Supervisor) -> None:
    url = _url(cluster, "bytes")
    writers, per_writer = 4, 10

    def scenario() -> None:
        with DurableStream.create(url, content_type="application/octet-stream") as handle:

            def write(w: int) -> None:
                for i in range(per_writer):
                    handle.append(f"<{w}:{i}>".encode())

            threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            with stream(url, live=False) as res:
                body = res.read_bytes().decode()
        for w in range(writers):  # every chunk landed whole, each writer's in order
            positions = [body.index(f"<{w}:{i}>") for i in range(per_writer)]
            assert positions == sorted(positions)
        assert len(body) == sum(len(f"<{w}:{i}>") for w in range(writers) for i in range(10))

    await trio.to_thread.run_sync(scenario)


async def test_long_poll_live_tail(cluster: Supervisor) -> None:
    url = _url(cluster, "longpoll")
    async with await AsyncDurableStream.create(
        url, content_type="application/json", batching=False
    ) as handle:
        tail = (await handle.append({"n": 0})).next_offset
    received: list[dict] = []

    def tail_reader() -> None:
        with stream(url, offset=tail, live="long-poll") as res:
            for item in res.iter_json():
                received.append(item)
                if len(received) == 3:
                    return

    async def writer() -> None:
        async with AsyncDurableStream(url, content_type="application/json", batching=False) as h:
            for n in (1, 2, 3):
                await trio.sleep(0.3)  # let the reader park in a long-poll first
                await h.append({"n": n})

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.to_thread.run_sync(tail_reader, abandon_on_cancel=True)
    assert received == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_sse_live_tail_async_client(cluster: Supervisor) -> None:
    url = _url(cluster, "sse")
    handle = await AsyncDurableStream.create(url, content_type="application/json", batching=False)
    async with handle:
        await handle.append({"n": 0})
        received: list[dict] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def writer() -> None:
                    for n in (1, 2, 3):
                        await trio.sleep(0.3)
                        await handle.append({"n": n})

                nursery.start_soon(writer)
                async with astream(url, offset="-1", live="sse") as res:
                    async for item in res.iter_json():
                        received.append(item)
                        if len(received) == 4:
                            break
        assert received == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]
        await handle.delete()
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 404
