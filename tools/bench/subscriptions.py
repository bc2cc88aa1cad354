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
            await trio.sleep(2)  # backfill and first notices settle
            rate = await _load(supervisor.url, paths, args.connections, args.duration)
            print(
                f"{'with' if subscribe else 'without':>7} subscriptions: {rate:8.0f} appends/s"
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
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse())
