"""A shard's metrics: plain counters the service bumps on its hot path, and the
collector that turns them (with the committer's histograms, the loop watchdog's and the
process's CPU and memory) into the samples the `metrics` RPC op answers.

Nothing here is served over HTTP: a gateway fetches these samples when it is scraped,
labels them `shard="<id>"` and merges them into its own `/metrics`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import GCCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ds_cluster.common import watchdog
from ds_cluster.common.metrics import (
    build_info,
    histogram_family,
    loop_stall_family,
    to_wire,
)

if TYPE_CHECKING:
    from ds_cluster.shard.committer import Committer
    from ds_cluster.shard.store import Store


class ShardCounters:
    """What the service counts as it serves (one trio thread: plain ints)."""

    __slots__ = (
        "append_bytes",
        "appends",
        "long_polls",
        "read_bytes",
        "read_bytes_unsent",
        "sse_sessions",
        "streams",
    )

    def __init__(self) -> None:
        self.appends = 0  # POSTs whose data was committed (duplicates and closes excluded)
        self.append_bytes = 0  # bytes of stream data those appends stored
        self.read_bytes = 0  # response body bytes of reads (GET bodies, SSE events)
        self.read_bytes_unsent = 0  # of those, bodies the gateway held (a body token's hit)
        self.streams = 0  # streams stored (soft-deleted ones until purged)
        self.long_polls = 0  # long-poll reads parked on a stream now
        self.sse_sessions = 0  # SSE responses being served now


def count_stored_streams(store: Store) -> int:
    """The streams in the database, counted once at start-up; the service then keeps the
    count as commits create and purge them."""
    return store.counts()[0]


class ShardCollector(Collector):
    """The service's counters and the committer's histograms as metric families."""

    def __init__(self, counters: ShardCounters, committer: Committer) -> None:
        self._counters = counters
        self._committer = committer

    def collect(self) -> Iterator[Metric]:
        counters = self._counters
        committer = self._committer
        yield CounterMetricFamily(
            "ds_appends",
            "Appends committed: POSTs that added data (idempotent duplicates excluded)",
            value=counters.appends,
        )
        yield CounterMetricFamily(
            "ds_append_bytes",
            "Bytes of stream data committed by appends",
            value=counters.append_bytes,
        )
        yield CounterMetricFamily(
            "ds_read_bytes",
            "Response body bytes of reads (catch-up and long-poll bodies, SSE events)",
            value=counters.read_bytes,
        )
        yield CounterMetricFamily(
            "ds_read_bytes_unsent",
            "Of those, bytes of bodies not sent to the gateway, which held them already",
            value=counters.read_bytes_unsent,
        )
        yield histogram_family(
            "ds_commit_batch_size",
            "Requests committed together in one SQLite transaction (group commit)",
            (),
            {(): committer.batch_sizes},
        )
        yield histogram_family(
            "ds_commit_duration_seconds",
            "Time one group commit's SQLite transaction took, fsync included",
            (),
            {(): committer.durations},
        )
        yield GaugeMetricFamily(
            "ds_streams",
            "Streams stored on the shard (soft-deleted ones until purged)",
            value=counters.streams,
        )
        live = GaugeMetricFamily(
            "ds_shard_live_reads",
            "Live reads the shard serves now, each one gateway call (which clients may share)",
            labels=["mode"],
        )
        live.add_metric(["long-poll"], counters.long_polls)
        live.add_metric(["sse"], counters.sse_sessions)
        yield live
        dog = watchdog.current()
        yield loop_stall_family(dog.histogram if dog is not None else None)
        yield build_info()


class ShardMetrics:
    """Everything the shard reports: its own collector, the process's CPU, memory and
    file descriptors, and the Python garbage collector's counts."""

    def __init__(self, counters: ShardCounters, committer: Committer) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(ShardCollector(counters, committer))

    def samples(self) -> list[list[object]]:
        """The `metrics` op's answer (`common.metrics.to_wire`)."""
        return to_wire(self.registry.collect())
