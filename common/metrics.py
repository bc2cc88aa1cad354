"""Metric pieces gateways and shards share: a histogram cheap enough for the hot path, and
the wire form in which a shard hands its samples to a gateway (the `metrics` RPC op).

prometheus_client's own Histogram takes a lock on every observation (about 1-2 us); a
gateway observes one per request, so the hot path keeps plain `Histogram`s here and the
scrape turns them into prometheus_client metric families (`histogram_family`). Everything
runs on one trio thread, so no lock is needed.

A shard's samples cross the RPC link as plain lists (`to_wire`) and are checked field by
field on the way back (`from_wire`): a shard is a peer that authenticated, but what it
sends is still bounded and validated before it reaches the exposition.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from platform import python_version

from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds: request durations (sub-millisecond appends up to long-polls and SSE minutes).
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
MAX_FAMILIES = 200  # metric families one shard may send
MAX_SAMPLES = 5000  # samples one shard may send, all families together
MAX_TEXT = 200  # characters in a name, label name or label value
# The classic names, which every Prometheus version reads (no quoting needed).
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
METRIC_TYPES = frozenset(
    {"counter", "gauge", "histogram", "summary", "info", "stateset", "unknown", "untyped"}
)


class Histogram:
    """Bucket counts and a sum; `observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)  # upper bounds, ascending; +Inf is implied
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count of observations <= le) per bucket, +Inf last: the exposition's form."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else _float_text(bound), float(total)))
        return out


def _float_text(value: float) -> str:
    return repr(float(value))


def histogram_family(
    name: str,
    documentation: str,
    label_names: Sequence[str],
    series: Mapping[tuple[str, ...], Histogram],
    unit: str = "",
) -> HistogramMetricFamily:
    """One histogram family from plain histograms keyed by their label values."""
    family = HistogramMetricFamily(name, documentation, labels=list(label_names), unit=unit)
    for values, histogram in series.items():
        family.add_metric(list(values), histogram.cumulative(), histogram.sum)
    return family


def build_info() -> GaugeMetricFamily:
    """`ds_build_info` 1, labelled with the version of ds-cluster and of Python."""
    try:
        ours = version("ds-cluster")
    except PackageNotFoundError:
        ours = "unknown"
    family = GaugeMetricFamily(
        "ds_build_info",
        "ds-cluster build: always 1, labelled with its version and Python's",
        labels=["version", "python_version"],
    )
    family.add_metric([ours, python_version()], 1.0)
    return family


# ---- the wire form ----------------------------------------------------------------------
#
# [[name, type, help, unit, [[sample name, {label: value}, value], ...]], ...]


def to_wire(families: Iterable[Metric]) -> list[list[object]]:
    """Metric families as plain msgpack-able lists."""
    return [
        [
            family.name,
            family.type,
            family.documentation,
            family.unit,
            [[s.name, dict(s.labels), float(s.value)] for s in family.samples],
        ]
        for family in families
    ]


class BadSamples(ValueError):
    """A shard's samples are not of the wire form."""


def from_wire(data: object, extra: Mapping[str, str]) -> list[Metric]:
    """A shard's families, each sample labelled with `extra` too (`shard="shard-0"`).
    Raises BadSamples for anything not of the form `to_wire` makes, or over the bounds."""
    if type(data) is not list or len(data) > MAX_FAMILIES:
        raise BadSamples("not a list of families")
    out: list[Metric] = []
    samples = 0
    for item in data:
        if type(item) is not list or len(item) != 5:
            raise BadSamples("a family is not [name, type, help, unit, samples]")
        name, typ, documentation, unit, rows = item
        if not (
            _is_name(name, _METRIC_NAME)
            and typ in METRIC_TYPES
            and type(documentation) is str
            and len(documentation) <= 1000
            and type(unit) is str
            and len(unit) <= MAX_TEXT
            and type(rows) is list
        ):
            raise BadSamples(f"bad family {str(name)[:60]!r}")
        samples += len(rows)
        if samples > MAX_SAMPLES:
            raise BadSamples("too many samples")
        family = Metric(name, documentation, typ, unit)
        for row in rows:
            if type(row) is not list or len(row) != 3:
                raise BadSamples(f"bad sample in {name!r}")
            sample_name, labels, value = row
            if not (
                _is_name(sample_name, _METRIC_NAME)
                and sample_name.startswith(name)
                and type(labels) is dict
                and len(labels) <= 20
                and all(_is_name(k, _LABEL_NAME) and _is_text(v) for k, v in labels.items())
                and type(value) in (float, int)
            ):
                raise BadSamples(f"bad sample in {name!r}")
            family.add_sample(sample_name, {**labels, **extra}, float(value))
        out.append(family)
    return out


def _is_text(value: object) -> bool:
    return type(value) is str and len(value) <= MAX_TEXT


def _is_name(value: object, pattern: re.Pattern[str]) -> bool:
    return type(value) is str and len(value) <= MAX_TEXT and pattern.fullmatch(value) is not None


def merge(families: Iterable[Metric]) -> list[Metric]:
    """Families of the same name (the gateway's own and each shard's `process_*`, say)
    joined into one, as the text format wants each family once. A family whose type
    differs from the first of its name is dropped rather than mixed in."""
    merged: dict[str, Metric] = {}
    for family in families:
        first = merged.get(family.name)
        if first is None:
            first = merged[family.name] = Metric(
                family.name, family.documentation, family.type, family.unit
            )
        elif first.type != family.type:
            continue
        first.samples.extend(family.samples)
    return list(merged.values())


class Families(Collector):
    """A fixed list of families as a collector, for `prometheus_client.generate_latest`."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def loop_stall_family(histogram: Histogram | None) -> HistogramMetricFamily:
    """`ds_loop_stall_seconds` from the process's loop watchdog (`common.watchdog`)."""
    series: dict[tuple[str, ...], Histogram] = {(): histogram} if histogram is not None else {}
    return histogram_family(
        "ds_loop_stall_seconds",
        "Event-loop batches of 1 ms or more: time the loop ran tasks without looking at a socket",
        (),
        series,
    )
