"""Shared fixtures: a real cluster per test, and a summary of conformance runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from support.cluster import SUMMARY_PROPERTY, running_cluster

from ds_cluster.supervisor.cluster import Supervisor
from ds_cluster.tools.bench.targets import BenchTarget

# Property tests check what the code answers, not how fast a shared CI machine runs it: no
# per-example deadline and no "too slow" health check (both failed on loaded machines).
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Supervisor]:
    """A running cluster (2 shards unless parametrized indirectly with a shard count or a
    dict of `running_cluster` keyword arguments)."""
    param = getattr(request, "param", 2)
    options: dict[str, Any] = dict(param) if isinstance(param, dict) else {"shards": param}
    async with running_cluster(tmp_path, **options) as supervisor:
        yield supervisor


@pytest.fixture(scope="module")
def bench_cluster() -> Iterator[BenchTarget]:
    """A 1-shard cluster started by the bench's own target code, shared by a module's
    bench tests."""
    bt = BenchTarget("up:1")
    bt.start()
    try:
        yield bt
    finally:
        bt.stop()


@pytest.fixture
def start_cluster(tmp_path: Path) -> Callable[..., Any]:
    """`async with start_cluster(shards=4, long_poll_timeout=2) as supervisor: ...`"""
    counter = iter(range(1_000_000))

    def start(**options: Any) -> Any:
        return running_cluster(tmp_path / f"cluster-{next(counter)}", **options)

    return start


_CONFORMANCE_SUMMARIES: list[str] = []  # gathered from the reports, where pytest runs


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _CONFORMANCE_SUMMARIES.extend(
            str(value) for name, value in report.user_properties if name == SUMMARY_PROPERTY
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _CONFORMANCE_SUMMARIES:
        terminalreporter.section("conformance")
        for line in _CONFORMANCE_SUMMARIES:
            terminalreporter.write_line(line)
