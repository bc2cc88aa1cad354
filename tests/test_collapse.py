"""Live fan-out: identical long-polls in flight together share one shard call.

Against a real cluster: 200 long-poll readers of one stream all get the same data. Against
the real gateway process in front of an in-test wire server (which records exactly what a
shard would see): one upstream request per group of identical long-polls, a follower that
hangs up does not cancel the others, the last one leaving cancels the shard's call.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from support.fakeshard import Reply, ThreadedShard, threaded_shard
from support.http import parse_head
from support.processes import GatewayProcess, gateway_for

from ds_cluster.gateway import collapse
from ds_cluster.gateway.collapse import Collapser
from ds_cluster.supervisor.cluster import Supervisor

READERS = 200


# -- a real cluster ------------------------------------------------------------------------


async def read_raw(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET on its own connection; a Content-Length response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    status_line, headers, body = parse_head(data)
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("cluster", [{"shards": 2, "long_poll_timeout": 20}], indirect=True)
async def test_many_long_polls_get_the_same_data(cluster: Supervisor) -> None:
    name = f"fanout-{uuid.uuid4().hex[:8]}"
    port = int(cluster.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=30) as client:
        created = await client.put(name, headers={"Content-Type": "text/plain"}, content=b"a")
        assert created.status_code == 201
        tail = created.headers["stream-next-offset"]
        results: list[tuple[int, dict[str, str], bytes]] = []

        async def reader() -> None:
            results.append(await read_raw(port, f"/v1/stream/{name}?offset={tail}&live=long-poll"))

        async with trio.open_nursery() as nursery:
            for _ in range(READERS):
                nursery.start_soon(reader)
            await trio.sleep(1.0)  # let every reader park
            appended = await client.post(
                name, headers={"Content-Type": "text/plain"}, content=b"fan-out"
            )
            assert appended.status_code in (200, 204)
        next_offset = appended.headers["stream-next-offset"]
    assert len(results) == READERS
    for status, headers, body in results:
        assert status == 200
        assert body == b"fan-out"
        assert headers["stream-next-offset"] == next_offset


# -- the gateway in front of a recording wire server ------------------------------------------

RELEASE: dict[str, threading.Event] = {}  # answer the long-poll on this path once set
CANCELLED: dict[str, threading.Event] = {}


async def longpoll_shard(msg: dict[str, Any], reply: Reply) -> None:
    """Holds each request until its path is released (then 200 with the path as body), or
    until the gateway cancels it (recorded)."""
    path = msg["p"]
    release = RELEASE.setdefault(path, threading.Event())
    try:
        while not release.is_set():
            await trio.sleep(0.01)
        body = f"{path}?{msg['q']}".encode()
        headers = [["content-type", "text/plain"], ["stream-next-offset", "7"]]
        await reply({"k": "res", "i": msg["i"], "s": 200, "h": headers, "b": body, "more": False})
    finally:
        if trio.current_effective_deadline() == -math.inf:
            CANCELLED.setdefault(path, threading.Event()).set()


@pytest.fixture(scope="module")
def shard() -> Iterator[ThreadedShard]:
    with threaded_shard(longpoll_shard) as threaded:
        yield threaded


@pytest.fixture(scope="module")
def gateway(shard: ThreadedShard) -> Iterator[GatewayProcess]:
    with gateway_for(shard) as gw:
        yield gw


def upstream(shard: ThreadedShard, path: str) -> list[dict[str, Any]]:
    return [m for m in list(shard.shard.requests) if m["p"] == path]


async def until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_identical_long_polls_share_one_upstream_call(
    gateway: GatewayProcess, shard: ThreadedShard
) -> None:
    path = f"group-{uuid.uuid4().hex[:8]}"
    target = f"/v1/stream/{path}?offset=3&live=long-poll"
    other = f"/v1/stream/{path}?offset=4&live=long-poll"  # another offset: its own group
    results: list[tuple[int, dict[str, str], bytes]] = []

    async def reader(t: str) -> None:
        results.append(await read_raw(gateway.port, t))

    async with trio.open_nursery() as nursery:
        for n in range(READERS):
            nursery.start_soon(reader, target if n % 10 else other)
        await until(lambda: len(upstream(shard, path)) >= 2)
        await trio.sleep(0.3)  # every reader connected and joined
        RELEASE.setdefault(path, threading.Event()).set()
    assert len(results) == READERS
    assert {(s, b) for s, _, b in results} == {
        (200, f"{path}?offset=3&live=long-poll".encode()),
        (200, f"{path}?offset=4&live=long-poll".encode()),
    }
    assert all(h["stream-next-offset"] == "7" for _, h, _ in results)
    assert sorted(m["q"] for m in upstream(shard, path)) == [
        "offset=3&live=long-poll",
        "offset=4&live=long-poll",
    ]
    # A plain read is never shared.
    status, _, _ = await read_raw(gateway.port, f"/v1/stream/{path}?offset=3")
    assert status == 200 and len(upstream(shard, path)) == 3


async def open_waiters(port: int, target: str, count: int) -> list[trio.SocketStream]:
    """`count` raw connections that have each sent GET `target` (and read nothing)."""
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(request)
        streams.append(stream)
    return streams


async def test_follower_leaving_does_not_cancel_the_others(
    gateway: GatewayProcess, shard: ThreadedShard
) -> None:
    path = f"leave-{uuid.uuid4().hex[:8]}"
    target = f"/v1/stream/{path}?offset=3&live=long-poll"
    quitters = await open_waiters(gateway.port, target, 3)
    await until(lambda: len(upstream(shard, path)) == 1)
    stayer: list[tuple[int, dict[str, str], bytes]] = []

    async def stay() -> None:
        stayer.append(await read_raw(gateway.port, target))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stay)
        await trio.sleep(0.3)
        for stream in quitters:  # including the one whose request started the call
            await stream.aclose()
        await trio.sleep(0.5)
        assert not CANCELLED.get(path, threading.Event()).is_set()
        RELEASE.setdefault(path, threading.Event()).set()
    assert stayer[0][0] == 200 and stayer[0][2] == f"{path}?offset=3&live=long-poll".encode()
    assert len(upstream(shard, path)) == 1
    assert not CANCELLED.get(path, threading.Event()).is_set()


async def test_last_waiter_leaving_cancels_upstream(
    gateway: GatewayProcess, shard: ThreadedShard
) -> None:
    path = f"cancel-{uuid.uuid4().hex[:8]}"
    target = f"/v1/stream/{path}?offset=3&live=long-poll"
    streams = await open_waiters(gateway.port, target, 5)
    await until(lambda: len(upstream(shard, path)) == 1)
    await trio.sleep(0.2)
    for stream in streams:
        await stream.aclose()
    cancelled = CANCELLED.setdefault(path, threading.Event())
    await until(cancelled.is_set)
    # A new identical request after that starts a fresh call (and gets its answer).
    RELEASE.setdefault(path, threading.Event()).set()
    status, _, body = await read_raw(gateway.port, target)
    assert status == 200 and body == f"{path}?offset=3&live=long-poll".encode()
    assert len(upstream(shard, path)) == 2


# -- the collapser in process: how its waiters wait ---------------------------------------

ANSWER = (200, [(b"content-type", b"text/plain")], b"shared")
FAILED = (503, [], b"stopping")


class Client:
    """A waiter's client: `until_gone` returns once `leave()` was called, and counts the
    waits on it."""

    def __init__(self) -> None:
        self.gone = trio.Event()
        self.watched = 0

    async def until_gone(self) -> None:
        self.watched += 1
        await self.gone.wait()

    def leave(self) -> None:
        self.gone.set()


class Upstream:
    """A fetch answered when released, which records its calls and its cancellation."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.calls: list[Any] = []
        self.cancelled = trio.Event()

    async def fetch(self, request: Any, early: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self.calls.append(request)
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled.set()
            raise
        return ANSWER


async def test_waiters_answered_soon_never_watch_their_clients() -> None:
    """The cheap path: one fetch, and every waiter rescheduled with the one answer,
    without awaiting its client's `until_gone`."""
    upstream = Upstream()
    clients = [Client() for _ in range(50)]
    answers: list[Any] = []
    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, upstream.fetch, FAILED, watch_after=30.0)

        async def wait(client: Client) -> None:
            answers.append(await collapser.wait("key", "request", client.until_gone))

        async with trio.open_nursery() as waiters:
            for client in clients:
                waiters.start_soon(wait, client)
            await trio.testing.wait_all_tasks_blocked()
            assert collapser.waiting() == 50
            upstream.release.set()
        nursery.cancel_scope.cancel()
    assert upstream.calls == ["request"]
    assert len(answers) == 50 and all(answer is ANSWER for answer in answers)
    assert sum(client.watched for client in clients) == 0


async def test_parked_waiters_answers_are_written_from_the_fetch_before_they_resume() -> None:
    """A parked waiter's `write_at_once` gets the answer from the fetch's task: every one
    of them before any waiter runs again; a waiter without one just gets the answer, and
    one that watches its client (past the watch time) gets no early write."""
    upstream = Upstream()
    events: list[str] = []
    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, upstream.fetch, FAILED, watch_after=30.0)

        async def wait(name: str, at_once: bool) -> None:
            def write(answer: Any) -> None:
                assert answer is ANSWER
                events.append(f"write {name}")

            answer = await collapser.wait(
                "key", "request", Client().until_gone, write if at_once else None
            )
            assert answer is ANSWER
            events.append(f"resume {name}")

        async with trio.open_nursery() as waiters:
            for name, at_once in (("a", True), ("b", False), ("c", True)):
                waiters.start_soon(wait, name, at_once)
            await trio.testing.wait_all_tasks_blocked()
            upstream.release.set()
        late = Collapser(nursery, upstream.fetch, FAILED, watch_after=0.0)
        async with trio.open_nursery() as waiters:
            upstream.release = trio.Event()
            waiters.start_soon(late.wait, "key", "late", Client().until_gone, events.append)
            await trio.sleep(0.1)
            upstream.release.set()
        nursery.cancel_scope.cancel()
    assert sorted(events[:2]) == ["write a", "write c"]
    assert sorted(events[2:]) == ["resume a", "resume b", "resume c"]
    assert upstream.calls == ["request", "late"]


async def test_the_gateway_gives_up_its_cpu_once_after_writing_a_groups_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the fetch has written a group's answer to its parked clients, the gateway
    yields its CPU once (so that readers on this host, just woken, need not wait for the
    waiters' tasks to finish their requests); a group with nothing written at once does
    not yield."""
    events: list[str] = []
    monkeypatch.setattr(collapse.os, "sched_yield", lambda: events.append("yield"))
    upstream = Upstream()
    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, upstream.fetch, FAILED, watch_after=30.0)

        async def wait(key: str, name: str, at_once: bool) -> None:
            write = (lambda answer: events.append(f"write {name}")) if at_once else None
            await collapser.wait(key, "request", Client().until_gone, write)
            events.append(f"resume {name}")

        async with trio.open_nursery() as waiters:
            for name in "abc":
                waiters.start_soon(wait, "written", name, True)
            await trio.testing.wait_all_tasks_blocked()
            upstream.release.set()
        assert sorted(events[:3]) == ["write a", "write b", "write c"]
        assert events[3] == "yield"
        assert sorted(events[4:]) == ["resume a", "resume b", "resume c"]
        events.clear()
        upstream.release = trio.Event()
        async with trio.open_nursery() as waiters:
            waiters.start_soon(wait, "unwritten", "d", False)
            await trio.testing.wait_all_tasks_blocked()
            upstream.release.set()
        nursery.cancel_scope.cancel()
    assert events == ["resume d"]


async def test_an_early_answer_is_written_and_given_once_before_the_fetch_returns() -> None:
    """A fetch that hands its answer to `early` (as the shard connection's reader does)
    has every parked waiter written and rescheduled then, from the task that called
    `early`, while the fetch itself has not returned; what it returns later changes
    nothing, and a second `early` does nothing either."""
    events: list[str] = []
    fetch_returns = trio.Event()
    early_given = trio.Event()
    handed: list[Any] = []

    async def fetch(request: Any, early: Any) -> Any:
        handed.append(early)
        early_given.set()
        await fetch_returns.wait()
        return FAILED  # (a later render: ignored)

    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, fetch, FAILED, watch_after=30.0)

        async def wait(name: str) -> None:
            answer = await collapser.wait(
                "key", "request", Client().until_gone, lambda a: events.append(f"write {name}")
            )
            assert answer is ANSWER
            events.append(f"resume {name}")

        async with trio.open_nursery() as waiters:
            for name in "ab":
                waiters.start_soon(wait, name)
            await early_given.wait()
            await trio.testing.wait_all_tasks_blocked()
            handed[0](ANSWER)  # from this task, as the reader would
            assert sorted(events) == ["write a", "write b"]
            handed[0](FAILED)
            assert sorted(events) == ["write a", "write b"]
        assert sorted(events[2:]) == ["resume a", "resume b"]
        # a newcomer starts a new group (the answered one is gone)
        fetch_returns.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_long_wait_watches_clients_and_the_last_one_leaving_cancels_the_fetch() -> None:
    upstream = Upstream()
    clients = [Client() for _ in range(3)]
    answers: list[Any] = []
    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, upstream.fetch, FAILED, watch_after=0.2)

        async def wait(client: Client) -> None:
            answers.append(await collapser.wait("key", "request", client.until_gone))

        async with trio.open_nursery() as waiters:
            for client in clients:
                waiters.start_soon(wait, client)
            with trio.fail_after(10):
                while sum(client.watched for client in clients) < 3:
                    await trio.sleep(0.05)
            for client in clients[:2]:
                client.leave()
            await trio.sleep(0.2)
            assert not upstream.cancelled.is_set()  # one client still waits
            assert collapser.waiting() == 1
            clients[2].leave()
            with trio.fail_after(10):
                await upstream.cancelled.wait()
        assert collapser.waiting() == 0
        # An identical request after that starts a new fetch.
        upstream.release.set()
        assert await collapser.wait("key", "again", Client().until_gone) is ANSWER
        nursery.cancel_scope.cancel()
    assert answers == [None, None, None]  # every client left: nothing to answer
    assert upstream.calls == ["request", "again"]


async def test_waiters_that_join_a_watched_group_watch_at_once_and_get_the_answer() -> None:
    upstream = Upstream()
    early, late = Client(), Client()
    answers: list[Any] = []
    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, upstream.fetch, FAILED, watch_after=0.1)

        async def wait(client: Client) -> None:
            answers.append(await collapser.wait("key", "request", client.until_gone))

        async with trio.open_nursery() as waiters:
            waiters.start_soon(wait, early)
            with trio.fail_after(10):
                while not early.watched:
                    await trio.sleep(0.02)
            waiters.start_soon(wait, late)
            await trio.testing.wait_all_tasks_blocked()
            assert late.watched == 1
            upstream.release.set()
        nursery.cancel_scope.cancel()
    assert answers == [ANSWER, ANSWER]
    assert upstream.calls == ["request"]


async def test_cancelled_parked_waiters_leave_and_the_last_cancels_the_fetch() -> None:
    """A waiter's request cancelled while it is parked (its connection closes, the
    gateway stops) leaves its group like a client that hangs up."""
    upstream = Upstream()
    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, upstream.fetch, FAILED, watch_after=30.0)
        async with trio.open_nursery() as waiters:
            for _ in range(3):
                waiters.start_soon(collapser.wait, "key", "request", Client().until_gone)
            await trio.testing.wait_all_tasks_blocked()
            assert collapser.waiting() == 3
            waiters.cancel_scope.cancel()
        with trio.fail_after(10):
            await upstream.cancelled.wait()
        assert collapser.waiting() == 0
        nursery.cancel_scope.cancel()


async def test_a_fetch_that_fails_gives_its_waiters_the_failure_answer() -> None:
    async def broken(request: Any, early: Any) -> Any:
        raise RuntimeError("a bug")

    answers: list[Any] = []
    async with trio.open_nursery() as nursery:
        collapser = Collapser(nursery, broken, FAILED)

        async def wait() -> None:
            answers.append(await collapser.wait("key", "request", Client().until_gone))

        async with trio.open_nursery() as waiters:
            waiters.start_soon(wait)
            waiters.start_soon(wait)
        nursery.cancel_scope.cancel()
    assert answers == [FAILED, FAILED]
