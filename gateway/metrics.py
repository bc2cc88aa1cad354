"""The gateway's metrics: what it records per request, and `/metrics`, where a scrape
gets the gateway's own samples and every shard's, in the Prometheus text format.

Per request (the hot path) only plain Python runs: a dict lookup, two clock reads and a
`Histogram` observation (`common.metrics`), about a microsecond; prometheus_client's own
metric classes take a lock per update and are used only at scrape time, through a
collector. Names and labels follow the OpenTelemetry HTTP semantic conventions
(`http.server.request.duration` -> `http_server_request_duration_seconds`, with
`http_request_method`, `http_response_status_code`, `http_route` and `url_scheme`), plus
`live` (none | long-poll | sse) so that live reads, which last by design, do not skew
the durations of the rest. No label carries a stream path.

A scrape asks every shard for its samples with the `metrics` RPC op, all at once, each
within SHARD_TIMEOUT; the answers are labelled `shard="<id>"`. A shard that does not
answer in time (or is not connected) is reported as `ds_shard_up{shard=...} 0`, and the
scrape goes on without its samples.

`current` is the process's recorder, set by `enable` at start-up (None: metrics are off,
`--no-metrics`); the native route and the control app find it there.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Any

import trio
from prometheus_client import GCCollector, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ds_cluster.common import watchdog
from ds_cluster.common.metrics import (
    DURATION_BUCKETS,
    Families,
    Histogram,
    build_info,
    from_wire,
    histogram_family,
    loop_stall_family,
    merge,
)
from ds_cluster.common.paths import PREFIX_BYTES
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardUnavailable
from ds_cluster.gateway.route import live_mode
from ds_cluster.gateway.stream import StreamHandler

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what every Prometheus version reads
SHARD_TIMEOUT = 1.0  # seconds a scrape waits for a shard's samples
STREAM_ROUTE = "/v1/stream/{path}"
MAX_SERIES_KEYS = 1000  # method spellings remembered (each maps to a bounded label set)
CONTROL_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# Methods are labelled as they are; any other is "_OTHER" (OpenTelemetry's rule), so a
# client cannot make up label values.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"}
)
DURATION_LABELS = (
    "http_request_method",
    "http_response_status_code",
    "http_route",
    "live",
    "url_scheme",
)
ACTIVE_LABELS = ("http_request_method", "url_scheme")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def method_label(method: str) -> str:
    return method if method in METHODS else "_OTHER"


def live_label(method: str, query: bytes) -> str:
    """`live` as the shard will read it: "long-poll", "sse", else "none"."""
    if method != "GET":
        return "none"
    live = live_mode(query)
    return live if live in ("long-poll", "sse") else "none"


class Series:
    """The requests of one (method, scheme, live) label set: how many are in progress,
    and their durations by status (stream requests) or by (status, route) (the rest)."""

    __slots__ = ("active", "labels", "other", "stream")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels  # (method, scheme, live), the method normalised
        self.active = 0
        self.stream: dict[int, Histogram] = {}  # status -> durations, route STREAM_ROUTE
        self.other: dict[tuple[int, str], Histogram] = {}  # (status, route) -> durations

    def finish(self, status: int, duration: float, route: str | None = None) -> None:
        """A request of this series ended after `duration` seconds, with the status sent
        (0: none was); `route`: the route template, None for STREAM_ROUTE."""
        self.active -= 1
        if not status:
            return
        if route is None:
            histogram = self.stream.get(status)
            if histogram is None:
                histogram = self.stream[status] = Histogram(DURATION_BUCKETS)
        else:
            histogram = self.other.get((status, route))
            if histogram is None:
                histogram = self.other[(status, route)] = Histogram(DURATION_BUCKETS)
        # (`Histogram.observe`, written out: once per request)
        histogram.counts[bisect_left(histogram.bounds, duration)] += 1
        histogram.sum += duration


class Exchange:
    """One request being recorded: `end` it once, with the status sent (0: none was)."""

    __slots__ = ("_series", "_started")

    def __init__(self, series: Series) -> None:
        series.active += 1
        self._series = series
        self._started = perf_counter()

    def end(self, status: int, route: str | None = None) -> None:
        """`route`: the route template, None for STREAM_ROUTE."""
        self._series.finish(status, perf_counter() - self._started, route)


class GatewayMetrics:
    """The gateway's recorder (hot path) and its scrape."""

    def __init__(self, pool: ShardPool, stream: StreamHandler) -> None:
        self._pool = pool
        self._stream = stream
        # (method as sent, scheme, live) -> its series; a method outside METHODS shares
        # the "_OTHER" series, and at most MAX_SERIES_KEYS such spellings are remembered.
        self._lookup: dict[tuple[str, str, str], Series] = {}
        self.series: dict[tuple[str, str, str], Series] = {}  # by normalised labels
        # The series of plain appends (POST, http, none), once one was counted: kept by
        # the native route (`gateway.http1`) to count them without a lookup each.
        self.appends: Series | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_GatewayCollector(self))

    def exchange(self, method: str, scheme: str, live: str) -> Exchange:
        """Start recording a request (`method` as sent; it is normalised here)."""
        series = self._lookup.get((method, scheme, live))
        if series is None:
            series = self._series_for(method, scheme, live)
        return Exchange(series)

    def begin(self, method: str, scheme: str, live: str) -> Series:
        """`exchange` without an object per request (the native route's): the request
        counts as in progress until the caller passes its duration to `Series.finish`."""
        series = self._lookup.get((method, scheme, live))
        if series is None:
            series = self._series_for(method, scheme, live)
        series.active += 1
        return series

    def series_of(self, method: str, scheme: str, live: str) -> Series:
        """The series `begin` counts such a request in (the same object for as long as
        this recorder lives), without counting one."""
        series = self._lookup.get((method, scheme, live))
        return series if series is not None else self._series_for(method, scheme, live)

    def _series_for(self, method: str, scheme: str, live: str) -> Series:
        labels = (method_label(method), scheme, live)
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = Series(labels)
        if len(self._lookup) < MAX_SERIES_KEYS:
            self._lookup[(method, scheme, live)] = series
        return series

    def instrument(self, app: ASGIApp) -> ASGIApp:
        """`app` with every HTTP request recorded: the requests the native route
        (`gateway.native`, which records its own) leaves to ASGI."""

        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
            route: str | None = None  # STREAM_ROUTE
            if raw_path.startswith(PREFIX_BYTES):
                live = live_label(scope["method"], scope.get("query_string", b""))
            else:
                route = scope["path"] if scope["path"] in CONTROL_ROUTES else ""
                live = "none"
            exchange = self.exchange(scope["method"], scope.get("scheme", "http"), live)
            status = 0

            async def send_and_note(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_and_note)
            finally:
                exchange.end(status, route)

        return recorded

    async def scrape(self) -> bytes:
        """The text exposition: this gateway's families and every shard's, merged."""
        answers: dict[str, list[Metric] | None] = {}
        shard_ids = list(self._pool.connections)  # the ring may change meanwhile
        async with trio.open_nursery() as nursery:
            for shard_id in shard_ids:
                nursery.start_soon(self._fetch, shard_id, answers)
        up = GaugeMetricFamily(
            "ds_shard_up",
            "1 if the shard answered this gateway's scrape in time, else 0",
            labels=["shard"],
        )
        families: list[Metric] = [*self.registry.collect(), up]
        for shard_id in shard_ids:
            samples = answers.get(shard_id)
            up.add_metric([shard_id], 0.0 if samples is None else 1.0)
            families.extend(samples or ())
        return generate_latest(Families(merge(families)))

    async def _fetch(self, shard_id: str, answers: dict[str, list[Metric] | None]) -> None:
        answers[shard_id] = None
        try:
            with trio.move_on_after(SHARD_TIMEOUT):
                result = await self._pool.call(shard_id, "metrics", {}, SHARD_TIMEOUT)
                answers[shard_id] = from_wire(result.get("families"), {"shard": shard_id})
        except (ShardUnavailable, ShardError) as exc:
            log.debug("no metrics from %s: %s", shard_id, exc)  # ds_shard_up says so
        except ValueError as exc:  # BadSamples: the shard sent something else
            log.warning("metrics from %s refused: %s", shard_id, exc)

    def live_readers(self) -> tuple[int, int]:
        """(long-poll clients waiting, SSE clients) on this gateway."""
        return self._stream.collapser.waiting(), self._stream.fanout.subscribers()


class _GatewayCollector(Collector):
    """The gateway's own families, built from the recorder at scrape time."""

    def __init__(self, recorder: GatewayMetrics) -> None:
        self._recorder = recorder

    def collect(self) -> Iterator[Metric]:
        recorder = self._recorder
        durations: dict[tuple[str, ...], Histogram] = {}
        active: dict[tuple[str, str], int] = {}
        for (method, scheme, live), series in recorder.series.items():
            for status, histogram in series.stream.items():
                durations[(method, str(status), STREAM_ROUTE, live, scheme)] = histogram
            for (status, route), histogram in series.other.items():
                durations[(method, str(status), route, live, scheme)] = histogram
            active[(method, scheme)] = active.get((method, scheme), 0) + series.active
        yield histogram_family(
            "http_server_request_duration_seconds",
            "Duration of HTTP requests, until the response ended (live reads included, "
            "labelled by live mode)",
            DURATION_LABELS,
            durations,
        )
        in_progress = GaugeMetricFamily(
            "http_server_active_requests",
            "HTTP requests in progress (held SSE and long-poll reads included)",
            labels=list(ACTIVE_LABELS),
        )
        for (method, scheme), count in active.items():
            in_progress.add_metric([method, scheme], count)
        yield in_progress
        long_polls, sse = recorder.live_readers()
        readers = GaugeMetricFamily(
            "ds_live_readers", "Live-read clients held by this gateway", labels=["mode"]
        )
        readers.add_metric(["long-poll"], long_polls)
        readers.add_metric(["sse"], sse)
        yield readers
        yield GaugeMetricFamily(
            "ds_sse_shared_upstreams",
            "Shard SSE calls this gateway holds, each shared by the clients reading the same",
            value=recorder._stream.fanout.upstreams(),
        )
        bodies = recorder._stream.bodies
        yield GaugeMetricFamily(
            "ds_body_cache_bytes",
            "Bytes of large catch-up bodies this gateway keeps, so its shards need not send "
            "them again",
            value=bodies.held_bytes,
        )
        yield CounterMetricFamily(
            "ds_body_cache_hits",
            "Catch-up answers whose body the shard left out, the gateway holding it",
            value=bodies.hits,
        )
        yield CounterMetricFamily(
            "ds_body_cache_misses",
            "Catch-up answers to a request with a kept body's token whose body the shard sent",
            value=bodies.misses,
        )
        inflight = GaugeMetricFamily(
            "ds_rpc_inflight",
            "RPC calls to the shard in progress (a shared SSE call until it ends)",
            labels=["shard"],
        )
        for shard_id, conn in recorder._pool.connections.items():
            inflight.add_metric([shard_id], conn.in_flight)
        yield inflight
        dog = watchdog.current()
        yield loop_stall_family(dog.histogram if dog is not None else None)
        yield build_info()


current: GatewayMetrics | None = None


def enable(pool: ShardPool, stream: StreamHandler) -> GatewayMetrics:
    """Make a recorder this process's `current` one."""
    global current
    current = GatewayMetrics(pool, stream)
    return current
