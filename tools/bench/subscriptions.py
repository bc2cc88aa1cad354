"""Append throughput with and without subscriptions present (docs/subscriptions.md).

    python -m ds_cluster.tools.bench.subscriptions [--shards 4] [--streams 10000]
        [--subscriptions 1000] [--duration 15] [--connections 32] [--rounds 2]

Each run starts a fresh local cluster (`ds-cluster up` in a temporary directory), creates
`--streams` JSON streams `t<i>/s<j>` in `--subscriptions` groups, and in the runs "with"
one pull-wake subscription per group (`pattern: t<i>/*`, all waking into one stream that
nobody consumes, so every append after the first of a group is a notice the owner takes
and folds into a wake already in flight). Then `--connections` clients append small JSON
messages to random streams for `--duration` seconds; the figure is acknowledged appends
per second. Runs alternate (without, with, without, ...), as the machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import trio

from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor

JSON = {"content-type": "application/json"}


async def _setup(
    client: httpx.AsyncClient, streams: int, groups: int, subscribe: bool
) -> list[str]:
    per = max(1, streams // groups)
    paths = [f"t{i}/s{j}" for i in range(groups) for j in range(per)]
    limiter = trio.CapacityLimiter(32)

    async def idempotent_put(path: str, body: bytes) -> None:
        """A PUT, again after a dropped connection (the same PUT again is a 200)."""
        async with limiter:
            for attempt in range(5):
                try:
                    r = await client.put(f"/v1/stream/{path}", content=body, headers=JSON)
                except httpx.TransportError:
                    if attempt == 4:
                        raise
                    continue
                assert r.status_code in (200, 201), r.text
                return

    async def put(path: str, body: bytes = b"") -> None:
        await idempotent_put(path, body)

    async def subscribe_group(i: int) -> None:
        config = {"type": "pull-wake", "pattern": f"t{i}/*", "wake_stream": "wake/bench"}
        await idempotent_put(f"__ds/subscriptions/bench-{i}", json.dumps(config).encode())

    async with trio.open_nursery() as nursery:
        for path in paths:
            nursery.start_soon(put, path)
    await put("wake/bench", b"[]")
    if subscribe:
        async with trio.open_nursery() as nursery:
            for i in range(groups):
                nursery.start_soon(subscribe_group, i)
    return paths


async def _warm_up(client: httpx.AsyncClient, groups: int, subscribe: bool) -> None:
    """One append to every group, and (with subscriptions) until every subscription's
    first wake event is written: what is then measured is the steady state, where each
    append is a notice folded into a wake already in flight."""
    limiter = trio.CapacityLimiter(32)
    body = json.dumps({"event": "warm-up"}).encode()

    async def one(i: int) -> None:
        async with limiter:
            r = await client.post(f"/v1/stream/t{i}/s0", content=body, headers=JSON)
            assert r.status_code in (200, 204), r.text

    async with trio.open_nursery() as nursery:
        for i in range(groups):
            nursery.start_soon(one, i)
    if not subscribe:
        return
    with trio.fail_after(300):
        while True:
            r = await client.get("/v1/stream/wake/bench", params={"offset": "-1"})
            if r.status_code == 200 and len(r.json()) >= groups:
                return
            await trio.sleep(0.5)


async def _load(url: str, paths: list[str], connections: int, duration: float) -> float:
    done = 0
    body = json.dumps({"event": "x" * 64}).encode()

    async def worker(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            end = trio.current_time() + duration
            while trio.current_time() < end:
                path = rng.choice(paths)
                try:
                    r = await client.post(f"/v1/stream/{path}", content=body, headers=JSON)
                except httpx.TransportError:
                    continue  # not acknowledged: not counted
                assert r.status_code in (200, 204), r.text
                done += 1

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(connections):
            nursery.start_soon(worker, n)
    return done / (trio.current_time() - started)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes used so far (Linux /proc): a figure that
    other load on the machine does not move as much as throughput."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _run(args: argparse.Namespace, subscribe: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="ds-subs-bench-") as tmp:
        config = ClusterConfig(
            shards=args.shards,
            gateways=1,
            port=0,
            data_dir=Path(tmp) / "data",
            log_dir=Path(tmp) / "logs",
            ready_timeout=60.0,
            stop_grace=10.0,
        )
        supervisor = Supervisor(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            async with httpx.AsyncClient(base_url=supervisor.url, timeout=60) as client:
                began = time.monotonic()
                paths = await _setup(client, args.streams, args.subscriptions, subscribe)
                setup = time.monotonic() - began
                if args.warm_up:
                    await _warm_up(client, args.subscriptions, subscribe)
            pids = list(supervisor.child_pids().values())
            cpu_before = _cpu_seconds(pids)
            rate = await _load(supervisor.url, paths, args.connections, args.duration)
            cpu = (_cpu_seconds(pids) - cpu_before) / (rate * args.duration) * 1000
            print(
                f"{'with' if subscribe else 'without':>7} subscriptions: {rate:8.0f} appends/s,"
                f" {cpu:.2f} ms of server CPU per append"
                f"  (setup {setup:.0f} s, {len(paths)} streams)",
                flush=True,
            )
            nursery.cancel_scope.cancel()
    return rate


async def main(args: argparse.Namespace) -> None:
    results: dict[bool, list[float]] = {False: [], True: []}
    for _round in range(args.rounds):
        for subscribe in (False, True):
            results[subscribe].append(await _run(args, subscribe))
    without, with_ = statistics.median(results[False]), statistics.median(results[True])
    print(
        f"median: without {without:.0f}/s, with {args.subscriptions} subscriptions "
        f"{with_:.0f}/s ({with_ / without:.2f}x)"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--subscriptions", type=int, default=1_000)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="measure from the start, each subscription's first wake included",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse())
