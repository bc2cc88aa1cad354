"""The side-by-side summary: one row per headline figure, one column per target (the median
over its rounds), and a last column "ours vs best peer" as the performance issues write it.

"Ours" is target A (--url); the best peer is the other target with the best median in the
metric's direction (more req/s, MB/s, writer msg/s; less latency, CPU, memory). The ratio is
ours / best peer's, so for latency and CPU a ratio above 1 means we are behind; "(ahead)"
marks where we beat every peer. Rows without a direction (errors, lost) get no ratio.
Pure functions of the collected runs, so the arithmetic is unit-tested without servers.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from typing import Any

from .presets import fanout_shape, is_fanout

HIGHER = 1  # more is better
LOWER = -1  # less is better


@dataclass(frozen=True)
class Headline:
    metric: str  # key in a run's metrics
    label: str
    better: int | None  # HIGHER, LOWER, or None: shown without a ratio


_APPEND = [
    Headline("requests_per_s", "req/s", HIGHER),
    Headline("server_cpu_us_per_append", "server CPU per append, µs", LOWER),
    Headline("errors", "errors", None),
    Headline("verify_problems", "read-back problems", None),
]
_FANOUT = [
    Headline("p99_ms", "p99 ms", LOWER),
    Headline("writer_rate", "writer msg/s", HIGHER),
    Headline("lost", "lost", None),
    Headline("duplicates", "duplicates", None),
]
HEADLINES: dict[str, list[Headline]] = {
    "append": _APPEND,
    "json": _APPEND,
    "json-batch": [_APPEND[0], Headline("messages_per_s", "messages/s", HIGHER), *_APPEND[1:]],
    "catchup": [Headline("mb_per_s", "MB/s", HIGHER), Headline("errors", "errors", None)],
    "idle": [
        Headline("kib_per_conn", "KiB per connection", LOWER),
        Headline("held", "held", None),
    ],
}


def headlines(scenario: str) -> list[Headline]:
    return _FANOUT if is_fanout(scenario) else HEADLINES[scenario]


def title(scenario: str, args: argparse.Namespace) -> str:
    """What a scenario's load was, in the words of the issue's table."""
    if scenario in ("append", "json", "json-batch"):
        body = {"append": "100 B", "json": "1 JSON message", "json-batch": "10 JSON messages"}
        return (
            f"{'append' if scenario == 'append' else scenario}, {args.connections} connections"
            f" / {args.streams} streams / {body[scenario]}"
        )
    if scenario == "catchup":
        size = args.catchup_size
        size_s = f"{size / (1 << 20):g} MiB" if size >= 1 << 20 else f"{size / 1024:g} KiB"
        return (
            f"catch-up, {args.catchup_readers} connections / {args.catchup_streams} streams"
            f" of {size_s}"
        )
    if is_fanout(scenario):
        shape = fanout_shape(scenario, args)
        mode = "SSE" if shape.mode == "sse" else shape.mode
        return f"{mode}, {shape.readers:,} readers / {shape.streams} streams / {shape.rate:g} msg/s"
    return f"{args.idle_connections:,} idle SSE connections"


def median_metric(runs: list[dict[str, Any]], metric: str) -> float:
    """Median of a metric over the runs that produced it (nan when none did)."""
    nums = [
        float(v)
        for m in runs
        if isinstance(v := m.get(metric), int | float) and not isinstance(v, bool)
    ]
    nums = [v for v in nums if not math.isnan(v)]
    return statistics.median(nums) if nums else math.nan


def ours_vs_best(ours: float, peers: dict[str, float], better: int) -> tuple[str, float, bool]:
    """(best peer, ours / best peer's value, ours beats it); ("", nan, False) without one."""
    valid = {lab: v for lab, v in peers.items() if not math.isnan(v)}
    if not valid or math.isnan(ours):
        return "", math.nan, False
    best = max(valid, key=lambda lab: better * valid[lab])
    theirs = valid[best]
    if theirs == 0:
        return best, math.nan, better * ours > 0
    ratio = ours / theirs
    return best, ratio, (ratio > 1) if better == HIGHER else (ratio < 1)


def ratio_text(best: str, ratio: float, ahead: bool) -> str:
    if not best:
        return ""
    if math.isnan(ratio):
        return f"- ({best}: 0)"
    return f"{ratio:.2f}x {best}" + (" (ahead)" if ahead else "")


def summary(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    labels: list[str],
    scenarios: list[str],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """The summary rows: scenario title, metric label, per-target medians, and the ratio."""
    rows: list[dict[str, Any]] = []
    ours, peers = labels[0], labels[1:]
    for scenario in scenarios:
        runs = results.get(scenario, {})
        for h in headlines(scenario):
            values = {lab: median_metric(runs.get(lab, []), h.metric) for lab in labels}
            row: dict[str, Any] = {
                "scenario": title(scenario, args),
                "metric": h.label,
                "key": h.metric,
                "values": values,
                "ours_vs_best": "",
            }
            if h.better is not None and peers:
                best, ratio, ahead = ours_vs_best(
                    values[ours], {lab: values[lab] for lab in peers}, h.better
                )
                row.update(best_peer=best, ratio=ratio, ahead=ahead)
                row["ours_vs_best"] = ratio_text(best, ratio, ahead)
            rows.append(row)
    return rows


def fmt(v: Any) -> str:
    """A table cell: thousands separators from 100 up, two decimals below, '-' for none."""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """The summary as a markdown table (the form docs/performance.md quotes)."""
    head = ["scenario", "metric", *labels, "ours vs best peer"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * len(labels) + "---|",
    ]
    for r in rows:
        cells = [r["scenario"], r["metric"], *(fmt(r["values"][lab]) for lab in labels)]
        lines.append("| " + " | ".join([*cells, r["ours_vs_best"]]) + " |")
    return "\n".join(lines)
