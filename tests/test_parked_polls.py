"""Long-polls parked on the shard without a task (`shard.polls`): answered by the commit
that moves their stream, once, in order, never before that commit; answered 204 when
their timeout passes; and let go when their caller cancels or its connection ends."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import trio
from support.cluster import running_cluster

from ds_cluster.shard.polls import COMPACT_AT, ParkedPoll, PollTimer

TEXT = {"content-type": "text/plain"}


async def _poll_until(
    client: httpx.AsyncClient, path: str, want: int, got: list[bytes], offset: str = "-1"
) -> None:
    """Long-poll `path` from `offset`, collecting each answer's messages, until `want`."""
    cursor = ""
    while len(got) < want:
        params = {"offset": offset, "live": "long-poll"}
        if cursor:
            params["cursor"] = cursor
        response = await client.get(path, params=params)
        assert response.status_code in (200, 204), response.status_code
        got += [m for m in response.content.split(b";") if m]
        offset = response.headers["stream-next-offset"]
        cursor = response.headers.get("stream-cursor", "")


async def test_parked_long_polls_get_every_message_once_in_order(tmp_path: Path) -> None:
    # Readers of two streams long-poll in a loop (parked on the shard between messages)
    # while a writer appends to both in turn: each reader gets its stream's messages,
    # each once, in the order they were acknowledged.
    count = 40
    async with (
        running_cluster(tmp_path, shards=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=60) as client,
    ):
        for name in ("a", "b"):
            assert (await client.put(name, headers=TEXT)).status_code == 201
        results: dict[tuple[str, int], list[bytes]] = {}
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for name in ("a", "b"):
                    for reader in range(3):
                        got = results[(name, reader)] = []
                        nursery.start_soon(_poll_until, client, name, count, got)
                await trio.sleep(0.3)  # (parked, most of them)
                for n in range(count):
                    for name in ("a", "b"):
                        r = await client.post(
                            name, content=b"%s%d;" % (name.encode(), n), headers=TEXT
                        )
                        assert r.status_code == 204
                    if n % 8 == 0:
                        await trio.sleep(0.05)  # some messages find their readers parked
        for (name, _reader), got in results.items():
            assert got == [b"%s%d" % (name.encode(), n) for n in range(count)]


async def test_a_parked_long_poll_times_out_with_204(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=1, long_poll_timeout=1) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client,
    ):
        r = await client.put("quiet", headers=TEXT)
        tail = r.headers["stream-next-offset"]
        started = trio.current_time()
        polls = []

        async def poll() -> None:
            params = {"offset": tail, "live": "long-poll", "cursor": str(len(polls))}
            polls.append(await client.get("quiet", params=params))

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # different cursors: three calls parked on the shard
                nursery.start_soon(poll)
        assert [p.status_code for p in polls] == [204, 204, 204]
        assert all(p.headers["stream-next-offset"] == tail for p in polls)
        assert 0.9 < trio.current_time() - started < 10
        # the stream still works for the next reader and writer
        r = await client.post("quiet", content=b"after", headers=TEXT)
        assert r.status_code == 204
        again = await client.get("quiet", params={"offset": tail, "live": "long-poll"})
        assert again.status_code == 200 and again.content == b"after"


def _chattr(flag: str, *paths: Path) -> None:
    for path in paths:
        if path.exists():
            subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


async def test_a_parked_long_poll_is_not_answered_with_a_write_that_did_not_commit(
    tmp_path: Path,
) -> None:
    probe = tmp_path / "probe"
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("the filesystem does not support chattr +i")
    _chattr("-i", probe)
    files: list[Path] = []
    try:
        async with (
            running_cluster(tmp_path, shards=1) as cluster,
            httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=60) as client,
        ):
            r = await client.put("w", headers=TEXT)
            tail = r.headers["stream-next-offset"]
            files = sorted((tmp_path / "data").glob("shard-0*/shard.db*"))
            assert files, list((tmp_path / "data").rglob("*"))
            answers: list[httpx.Response] = []

            async def poll() -> None:
                params = {"offset": tail, "live": "long-poll"}
                answers.append(await client.get("w", params=params))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.5)  # parked
                _chattr("+i", *files)
                refused = await client.post("w", content=b"refused", headers=TEXT)
                assert refused.status_code in (503, 507), refused.status_code
                await trio.sleep(0.5)
                assert answers == []  # still parked: the write was not committed
                _chattr("-i", *files)
                with trio.fail_after(30):
                    while True:  # the shard reopens its database with a backoff
                        r = await client.post("w", content=b"committed", headers=TEXT)
                        if r.status_code == 204:
                            break
                        await trio.sleep(0.2)
            assert [a.status_code for a in answers] == [200]
            assert answers[0].content == b"committed"
    finally:
        _chattr("-i", *files)


async def test_poll_timer_expires_in_deadline_order_and_skips_answered_polls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    expired: list[int] = []
    polls: dict[int, ParkedPoll] = {}
    timer = PollTimer(lambda poll: expired.append(next(k for k, p in polls.items() if p is poll)))

    def park(key: int, deadline: float) -> ParkedPoll:
        poll = ParkedPoll(None, None, None, deadline, print, lambda p: True)  # type: ignore[arg-type]
        polls[key] = poll
        timer.add(poll)
        return poll

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        await trio.testing.wait_all_tasks_blocked()
        park(1, 10.0)
        park(2, 5.0)  # earlier than what the timer sleeps for
        answered = park(3, 7.0)
        answered.done = True
        timer.done()
        await trio.sleep(6)
        assert expired == [2]
        await trio.sleep(5)
        assert expired == [2, 1]  # 3 was answered: never expired
        # many answered polls are dropped from the heap before their deadline
        for key in range(100, 100 + 2 * COMPACT_AT):
            poll = park(key, 1000.0)
            poll.done = True
            timer.done()
        assert len(timer._heap) < COMPACT_AT
        park(4, 20.0)
        await trio.sleep(10)
        assert expired == [2, 1, 4]
        nursery.cancel_scope.cancel()
