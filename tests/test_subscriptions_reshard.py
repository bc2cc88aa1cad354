"""Subscriptions move with the ring (real shard and gateway processes, real SQLite, a real
webhook receiver on 127.0.0.1).

A webhook and a pull-wake subscription whose pattern matches streams on every shard are
owned by shards the ring takes them from when it grows 2 -> 3, and back when it shrinks
3 -> 2. After each change they are read through the gateway, an append on a stream that
moved and on a stream created on the new owner wakes them, every pending offset is
acknowledged in the end, and no generation is delivered twice. A move also resumes after
the old owner is killed halfway.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from test_reshard import cluster_of
from test_subscriptions import (
    Receiver,
    append,
    create_stream,
    create_sub,
    eventually,
    free_port,
    get_sub,
    tail_of,
    wake_events,
)

from ds_cluster.common.ring import Ring

pytestmark = pytest.mark.slow

PATTERN = "rs/*"
WAKE_STREAM = "wake/rs"


def key(sub_id: str) -> str:
    return f"__ds/subscriptions/{sub_id}"


def sub_id_owned_by(ring: Ring, prefix: str, shard: str) -> str:
    return next(f"{prefix}-{i}" for i in range(10_000) if ring.owner(key(f"{prefix}-{i}")) == shard)


def stream_name(prefix: str, owner_now: tuple[Ring, str], owner_next: tuple[Ring, str]) -> str:
    """A stream name owned by one shard under one ring and by another under a second."""
    for i in range(100_000):
        name = f"{prefix}-{i}"
        if all(ring.owner(name) == shard for ring, shard in (owner_now, owner_next)):
            return name
    raise AssertionError("no such name")


async def claim_until(client: httpx.AsyncClient, sub_id: str, tails: dict[str, str]) -> Any:
    """Claim the pull-wake subscription until every stream of `tails` shows pending at
    that tail (releasing the claims that came too early), then ack them all."""

    async def attempt() -> Any:
        r = await client.post(
            f"/v1/stream/__ds/subscriptions/{sub_id}/claim", json={"worker": "w1"}
        )
        if r.status_code == 409:  # no pending work yet: the notices are on their way
            return None
        assert r.status_code == 200, r.text
        claimed = r.json()
        pending = {s["path"]: s["tail_offset"] for s in claimed["streams"] if s["has_pending"]}
        auth = {"authorization": f"Bearer {claimed['token']}"}
        fence = {"wake_id": claimed["wake_id"], "generation": claimed["generation"]}
        if all(pending.get(p) == t for p, t in tails.items()):
            ack = {**fence, "acks": [{"stream": p, "offset": o} for p, o in pending.items()]}
            r = await client.post(
                f"/v1/stream/__ds/subscriptions/{sub_id}/ack",
                json={**ack, "done": True},
                headers=auth,
            )
            assert r.status_code == 200, r.text
            return claimed
        r = await client.post(
            f"/v1/stream/__ds/subscriptions/{sub_id}/release", json=fence, headers=auth
        )
        assert r.status_code == 204, r.text
        await trio.sleep(0.2)
        return None

    return await eventually(attempt)


async def hooked_until(receiver: Receiver, tails: dict[str, str], since: int) -> None:
    """Wait until the webhooks after the first `since` together showed every stream of
    `tails` pending at (at least) that tail."""

    async def seen() -> bool:
        shown: dict[str, str] = {}
        for _headers, body in receiver.requests[since:]:
            for s in json.loads(body)["streams"]:
                if s["has_pending"]:
                    shown[s["path"]] = max(shown.get(s["path"], ""), s["tail_offset"])
        return all(shown.get(p, "") >= t for p, t in tails.items())

    await eventually(seen)


async def all_acked(client: httpx.AsyncClient, sub_id: str, paths: list[str]) -> bool:
    acked = {s["path"]: s["acked_offset"] for s in (await get_sub(client, sub_id))["streams"]}
    for path in paths:
        if acked.get(path) != await tail_of(client, path):
            return False
    return True


def generations(receiver: Receiver) -> list[int]:
    return [json.loads(body)["generation"] for _h, body in receiver.requests]


async def test_subscriptions_move_two_to_three_and_back(tmp_path: Path) -> None:
    receiver = Receiver(free_port(), reply={"done": True})
    async with (
        cluster_of(tmp_path, initial=2, spare=1) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(receiver.serve)
        two = cluster.ring_of(1, ["s0", "s1"])
        three = cluster.ring_of(2, ["s0", "s1", "s2"])
        hook = sub_id_owned_by(three, "hook", "s2")  # both move to s2, then back
        pull = sub_id_owned_by(three, "pull", "s2")
        assert two.owner(key(hook)) != "s2" and two.owner(key(pull)) != "s2"

        # Streams on every shard, one of which moves to s2 when the ring grows.
        moving = stream_name("rs/moving", (two, "s0"), (three, "s2"))
        staying = stream_name("rs/staying", (two, "s1"), (three, "s1"))
        paths = [moving, staying]
        for path in paths:
            await create_stream(client, path, b'[{"n": 0}]')
        await create_stream(client, WAKE_STREAM, b"[]")
        await create_sub(
            client,
            hook,
            {"type": "webhook", "pattern": PATTERN, "webhook": {"url": receiver.url}},
        )
        await create_sub(
            client, pull, {"type": "pull-wake", "pattern": PATTERN, "wake_stream": WAKE_STREAM}
        )
        # They work before the move.
        tails = {staying: await append(client, staying, {"n": 1})}
        await hooked_until(receiver, tails, 0)
        await claim_until(client, pull, tails)

        # 2 -> 3: the subscriptions (and one stream) move to s2.
        cluster.start("s2", three)
        await cluster.set_ring(three, via="s0")
        statuses = await cluster.wait_moved(["s0", "s1", "s2"])
        assert all(s["subscriptions_out"] == 0 for s in statuses), statuses
        for sub_id in (hook, pull):
            sub = await get_sub(client, sub_id)  # served by its new owner
            assert {s["path"] for s in sub["streams"]} >= set(paths), sub
        fresh = stream_name("rs/fresh", (three, "s2"), (two, "s0"))
        paths.append(fresh)
        since = len(receiver.requests)
        tails = {
            moving: await append(client, moving, {"n": 2}),
            fresh: await create_stream(client, fresh, b'[{"n": 3}]'),
        }
        await hooked_until(receiver, tails, since)
        await claim_until(client, pull, tails)

        # 3 -> 2: back to their first owners; s2's stream goes to s0.
        two_again = cluster.ring_of(3, ["s0", "s1"])
        await cluster.set_ring(two_again, via="s1")
        statuses = await cluster.wait_moved(["s0", "s1", "s2"])
        assert statuses[2]["streams"] == 0 and statuses[2]["subscriptions_out"] == 0, statuses
        for sub_id in (hook, pull):  # s2 answers `misdirected`: the gateway takes ring v3
            assert {s["path"] for s in (await get_sub(client, sub_id))["streams"]} == set(paths)
        cluster.shards.pop("s2").stop()
        since = len(receiver.requests)
        tails = {
            fresh: await append(client, fresh, {"n": 4}),
            moving: await append(client, moving, {"n": 5}),
            staying: await append(client, staying, {"n": 6}),
        }
        await hooked_until(receiver, tails, since)
        await claim_until(client, pull, tails)

        # Nothing lost: every stream acknowledged at its tail by both.
        for sub_id in (hook, pull):
            await eventually(lambda sub_id=sub_id: all_acked(client, sub_id, paths))
        # Nothing twice: one webhook per generation, one wake event per generation.
        delivered = generations(receiver)
        assert delivered == sorted(set(delivered)), delivered
        events = [e["generation"] for e in await wake_events(client, WAKE_STREAM, pull)]
        assert len(events) == len(set(events)), events
        nursery.cancel_scope.cancel()


async def test_a_move_resumes_after_the_old_owner_is_killed(tmp_path: Path) -> None:
    """The new owner is stopped when the ring changes, so the subscriptions cannot
    leave; their old owner is SIGKILLed and restarted, then the new owner resumes: the
    move completes from the old owner's database. An explicit link follows its stream to
    its new owner."""
    async with (
        cluster_of(tmp_path, initial=2, spare=1) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
    ):
        two = cluster.ring_of(1, ["s0", "s1"])
        three = cluster.ring_of(2, ["s0", "s1", "s2"])
        sub_id = sub_id_owned_by(three, "linked", "s2")
        old_owner = two.owner(key(sub_id))
        moving = stream_name("rs/moving", (two, "s0"), (three, "s2"))
        await create_stream(client, moving, b'[{"n": 0}]')
        await create_stream(client, WAKE_STREAM, b"[]")
        config = {"type": "pull-wake", "streams": [moving], "wake_stream": WAKE_STREAM}
        await create_sub(client, sub_id, config)
        await claim_until(client, sub_id, {moving: await append(client, moving, {"n": 1})})

        new = cluster.start("s2", three)
        await cluster.call("s2", "ring_get", {})  # it is up and serving
        new.proc.send_signal(signal.SIGSTOP)
        try:
            await cluster.set_ring(three, via="s0")
            await trio.sleep(1)  # the old owner tries, and cannot reach s2
            cluster.kill(old_owner)
            cluster.start(old_owner, three)
        finally:
            new.proc.send_signal(signal.SIGCONT)
        statuses = await cluster.wait_moved(["s0", "s1", "s2"])
        assert all(s["subscriptions_out"] == 0 for s in statuses), statuses
        sub = await get_sub(client, sub_id)
        assert [s["path"] for s in sub["streams"]] == [moving], sub
        tails = {moving: await append(client, moving, {"n": 2})}
        await claim_until(client, sub_id, tails)
        await eventually(lambda: all_acked(client, sub_id, [moving]))
        events = [e["generation"] for e in await wake_events(client, WAKE_STREAM, sub_id)]
        assert len(events) == len(set(events)), events
