"""Start a real ds-cluster for a test: real shard and gateway processes, real SQLite.

The cluster runs under `ds_cluster.supervisor.cluster.Supervisor` in a background trio task, on free
ports, with its data and one log file per child under the test's temporary directory.
When the block exits every child is stopped; the tail of each child's log is printed so
pytest shows it beside a failing test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import trio

from ds_cluster.common.ring import Ring
from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor

LOG_TAIL_LINES = 40

# Filled by tests/test_conformance.py; printed by conftest at the end of the run.
SUMMARY_PROPERTY = "conformance"  # a conformance run's summary lines, as test properties


@asynccontextmanager
async def running_cluster(
    base_dir: Path, *, shards: int = 2, gateways: int = 1, **options: Any
) -> AsyncIterator[Supervisor]:
    """Yield a ready Supervisor (`.url`, `.child_pids()`, `.restarts`); stop it after.

    `options` are further `ClusterConfig` fields (long_poll_timeout, sse_max_duration, ...).
    """
    options.setdefault("ready_timeout", 60.0)
    options.setdefault("stop_grace", 10.0)
    config = ClusterConfig(
        shards=shards,
        gateways=gateways,
        port=0,
        data_dir=base_dir / "data",
        log_dir=base_dir / "logs",
        **options,
    )
    supervisor = Supervisor(config)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            try:
                yield supervisor
            finally:
                nursery.cancel_scope.cancel()
    finally:
        print_log_tails(base_dir / "logs")


def print_log_tails(log_dir: Path, lines: int = LOG_TAIL_LINES) -> None:
    """Print the last lines of each child's log (captured by pytest; shown on failure)."""
    if not log_dir.is_dir():
        return
    for path in sorted(log_dir.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"----- {path.name} (last {len(tail)} lines) -----")
        print("\n".join(tail))


def names_on_each_shard(cluster: Supervisor, prefix: str) -> dict[str, str]:
    """One fresh stream name per shard id, chosen by the same ring the gateway uses."""
    ring = Ring(1, tuple(cluster.shard_ids))
    found: dict[str, str] = {}
    while len(found) < len(ring.shard_ids):
        name = f"{prefix}-{uuid4().hex[:8]}"
        found.setdefault(ring.owner(name), name)
    return found
