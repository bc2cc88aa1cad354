"""Progress lines while a chaos run goes, and the summary table / JSON report at the end."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import TypedDict

from .model import FaultEvent, ReaderLog, Stats, Violation
from .scaling import ScaleEvent
from .verify import Verdict


class ScaleFigures(TypedDict):
    longest_write_moved_stream: float | None
    longest_write_unmoved_stream: float | None
    scale_events: int
    scale_failures: int
    streams_moved: int
    bytes_moved: int
    longest_scale: float | None


@dataclass
class ChaosResult:
    seed: int
    shards: int
    duration: float
    kill_interval: float
    stats: Stats
    faults: list[FaultEvent]
    verdict: Verdict
    readers: list[ReaderLog]
    streams: int
    healthy: bool
    health_detail: list[str] = field(default_factory=list)
    data_dir: str | None = None
    kill_supervisor_interval: float = 0.0
    scales: list[ScaleEvent] = field(default_factory=list)
    moved_paths: list[str] = field(default_factory=list)  # streams a scale moved
    scale_interval: float = 0.0

    @property
    def violations(self) -> list[Violation]:
        extra = [Violation("unhealthy", "-", d) for d in self.health_detail]
        return self.verdict.violations + extra

    @property
    def passed(self) -> bool:
        return not self.violations and self.healthy

    def unavailability(self, kind: str | None = None) -> float | None:
        values = [
            e.recovered_after
            for e in self.faults
            if e.recovered_after is not None and (kind is None or e.kind == kind)
        ]
        return max(values) if values else None

    def kill_figures(self) -> dict[str, float | None]:
        """Median and longest unavailability after kills, and the supervisor's part of it."""
        down = sorted(
            e.recovered_after
            for e in self.faults
            if e.kind == "kill" and e.recovered_after is not None
        )
        respawn = sorted(
            e.respawned_after
            for e in self.faults
            if e.kind == "kill" and e.respawned_after is not None
        )
        return {
            "median_unavailability_kill": statistics.median(down) if down else None,
            "median_respawn": statistics.median(respawn) if respawn else None,
            "longest_respawn": respawn[-1] if respawn else None,
        }

    def write_figures(self) -> dict[str, float | None]:
        """Write latency from first attempt to acknowledgement: p99 and longest (a write
        stalled by a move, a kill or a stop waits, retries, and is counted whole)."""
        latencies = sorted(self.stats.write_latencies)
        if not latencies:
            return {"write_p99": None, "longest_write": None}
        return {
            "write_p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "longest_write": latencies[-1],
        }

    def scale_figures(self) -> ScaleFigures:
        done = [e for e in self.scales if e.ok]
        longest = self.stats.longest_write_by_stream
        moved = set(self.moved_paths)
        return {
            "longest_write_moved_stream": max(
                (t for p, t in longest.items() if p in moved), default=None
            ),
            "longest_write_unmoved_stream": max(
                (t for p, t in longest.items() if p not in moved), default=None
            ),
            "scale_events": len(done),
            "scale_failures": len(self.scales) - len(done),
            "streams_moved": sum(e.moved_streams for e in done),
            "bytes_moved": sum(e.moved_bytes for e in done),
            "longest_scale": max((e.took or 0.0 for e in done), default=None),
        }

    def supervisor_figures(self) -> dict[str, float | None]:
        """Longest time to a new ready supervisor after a supervisor kill."""
        ready = [
            e.respawned_after
            for e in self.faults
            if e.kind == "supervisor-kill" and e.respawned_after is not None
        ]
        return {"longest_supervisor_restart": max(ready) if ready else None}

    def to_json(self) -> dict:
        verdict = self.verdict
        return {
            "passed": self.passed,
            "seed": self.seed,
            "shards": self.shards,
            "duration": self.duration,
            "kill_interval": self.kill_interval,
            "streams": self.streams,
            "acked_writes": self.stats.acked_batches,
            "acked_messages": self.stats.acked_messages,
            "duplicate_acks": self.stats.duplicates_acked,
            "retries": self.stats.retries,
            "statuses": self.stats.status_counts,
            "forks": self.stats.forks_created,
            "kills": sum(1 for e in self.faults if e.kind == "kill"),
            "stops": sum(1 for e in self.faults if e.kind == "stop"),
            "kill_supervisor_interval": self.kill_supervisor_interval,
            "supervisor_kills": sum(1 for e in self.faults if e.kind == "supervisor-kill"),
            "orphans": sum(1 for d in self.health_detail if d.startswith("orphan:")),
            "lost": verdict.lost,
            "duplicated": verdict.duplicated,
            "reordered": verdict.reordered,
            "phantom": verdict.phantom,
            "partial": verdict.partial,
            "reader_errors": sum(x.kind.startswith("reader") for x in self.violations),
            "reader_messages": sum(len(r.received) for r in self.readers),
            "reader_reconnects": sum(r.reconnects for r in self.readers),
            "reader_stalls": sum(r.stalls for r in self.readers),
            "longest_unavailability_kill": self.unavailability("kill"),
            "longest_unavailability_stop": self.unavailability("stop"),
            "longest_unavailability_supervisor_kill": self.unavailability("supervisor-kill"),
            **self.kill_figures(),
            **self.supervisor_figures(),
            **self.write_figures(),
            "client_errors": self.stats.client_errors(),
            "scale_interval": self.scale_interval,
            **self.scale_figures(),
            "scales": [asdict(e) for e in self.scales],
            "healthy": self.healthy,
            "faults": [asdict(e) for e in self.faults],
            "violations": [asdict(v) for v in self.violations],
        }

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)


def progress_line(
    elapsed: float,
    stats: Stats,
    rate: float,
    faults: list[FaultEvent],
    down: list[str],
    reader_messages: int,
    violations: int,
) -> str:
    kills = sum(1 for e in faults if e.kind == "kill")
    stops = sum(1 for e in faults if e.kind == "stop")
    supervisor_kills = len(faults) - kills - stops
    return (
        f"[chaos {elapsed:7.1f}s] acked {stats.acked_batches} writes "
        f"({rate:6.1f}/s), retries {stats.retries}, kills {kills}, stops {stops}, "
        + (f"supervisor kills {supervisor_kills}, " if supervisor_kills else "")
        + f"down {','.join(down) or '-'}, readers got {reader_messages}, "
        f"violations {violations}"
    )


def _recovery(event: FaultEvent) -> str:
    if event.recovered_after is not None:
        return _secs(event.recovered_after)
    return "left the ring" if event.left_ring else "NOT RECOVERED"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def summary(result: ChaosResult, max_violations: int = 40) -> str:
    v = result.verdict
    s = result.stats
    kills = [e for e in result.faults if e.kind == "kill"]
    stops = [e for e in result.faults if e.kind == "stop"]
    supervisor_kills = [e for e in result.faults if e.kind == "supervisor-kill"]
    modes: dict[str, int] = {}
    for r in result.readers:
        modes[r.mode] = modes.get(r.mode, 0) + 1
    figures = result.kill_figures()
    worst = max(kills, key=lambda e: e.recovered_after or 0.0, default=None)
    rows = [
        (
            "writes acknowledged",
            f"{s.acked_batches} ({s.acked_messages} messages, "
            f"{s.duplicates_acked} answered 204 on retry)",
        ),
        ("streams / forks", f"{result.streams} / {s.forks_created}"),
        ("kills / stops", f"{len(kills)} / {len(stops)}"),
        ("supervisor kills", str(len(supervisor_kills))),
        ("retries", str(s.retries)),
        ("lost", str(v.lost)),
        ("duplicated", str(v.duplicated)),
        ("reordered", str(v.reordered)),
        ("phantom / partial", f"{v.phantom} / {v.partial}"),
        ("reader violations", str(sum(x.kind.startswith("reader") for x in result.violations))),
        (
            "readers",
            ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
            + f"; {sum(len(r.received) for r in result.readers)} messages, "
            f"{sum(r.reconnects for r in result.readers)} reconnects, "
            f"{sum(r.stalls for r in result.readers)} stalls",
        ),
        (
            "longest unavailability",
            f"{_secs(result.unavailability('kill'))} after a kill"
            + (f" ({worst.shard} at {worst.at:.1f}s)" if worst and worst.recovered_after else "")
            + f", {_secs(result.unavailability('stop'))} after a stop",
        ),
        (
            "median after a kill",
            f"{_secs(figures['median_unavailability_kill'])}, of which the "
            f"supervisor's restart delay: median {_secs(figures['median_respawn'])}, "
            f"longest {_secs(figures['longest_respawn'])}",
        ),
        (
            "write latency",
            f"p99 {_secs(result.write_figures()['write_p99'])}, "
            f"longest {_secs(result.write_figures()['longest_write'])} (first try to ack)",
        ),
        (
            "client errors (4xx)",
            ", ".join(f"{k}: {n}" for k, n in sorted(s.client_errors().items())) or "none",
        ),
        ("cluster healthy at end", "yes" if result.healthy else "NO"),
    ]
    if result.scales:
        moves = result.scale_figures()
        rows.insert(
            -1,
            (
                "scale events",
                f"{moves['scale_events']} done, {moves['scale_failures']} failed; "
                f"{moves['streams_moved']} streams moved; longest scale "
                f"{_secs(moves['longest_scale'])}",
            ),
        )
        rows.insert(
            -1,
            (
                "longest write",
                f"{_secs(moves['longest_write_moved_stream'])} on a stream a scale moved, "
                f"{_secs(moves['longest_write_unmoved_stream'])} on the others",
            ),
        )
    if supervisor_kills:
        rows.insert(
            -1,
            (
                "after a supervisor kill",
                f"every shard wrote again after {_secs(result.unavailability('supervisor-kill'))} "
                f"at the longest; the new supervisor was ready after "
                f"{_secs(result.supervisor_figures()['longest_supervisor_restart'])} "
                f"at the longest; orphans: "
                f"{sum(1 for d in result.health_detail if d.startswith('orphan:'))}",
            ),
        )
    else:
        rows.remove(("supervisor kills", "0"))
    width = max(len(k) for k, _ in rows)
    every = "no shard faults"
    if result.kill_interval > 0:
        every = f"a fault every ~{result.kill_interval:g}s"
    if result.kill_supervisor_interval > 0:
        every += f", a supervisor kill every ~{result.kill_supervisor_interval:g}s"
    if result.scale_interval > 0:
        every += f", a scale every ~{result.scale_interval:g}s"
    lines = [
        f"ds-cluster chaos: seed {result.seed}, {result.shards} shards, "
        f"{result.duration:.0f}s, {every}",
        *(f"  {k.ljust(width)}  {val}" for k, val in rows),
    ]
    if result.scales:
        lines.append("")
        lines.append(f"  {'#':>3}  {'at':>7}  scale    took     moved")
        for i, scale in enumerate(result.scales, 1):
            took = _secs(scale.took) if scale.ok else f"FAILED: {scale.message}"
            lines.append(
                f"  {i:>3}  {scale.at:6.1f}s  {scale.before} -> {scale.after}   {took:<8} "
                f"{scale.moved_streams} streams, {scale.moved_bytes} bytes"
            )
    if result.faults:
        lines.append("")
        kind_width = max(len(e.kind) for e in result.faults)
        lines.append(
            f"  {'#':>3}  {'at':>7}  {'shard':<10} {'fault':<{kind_width}} {'pid':>7}  unavailable"
        )
        for i, e in enumerate(result.faults, 1):
            extra = f" (stopped {e.duration:.1f}s)" if e.kind == "stop" else ""
            if e.respawned_after is not None:
                what = "new supervisor ready" if e.kind == "supervisor-kill" else "respawned"
                extra = f" ({what} after {e.respawned_after:.2f}s)"
            lines.append(
                f"  {i:>3}  {e.at:6.1f}s  {e.shard:<10} {e.kind:<{kind_width}} {e.pid:>7}  "
                f"{_recovery(e)}"
                f"{extra}"
            )
    violations = result.violations
    if violations:
        lines.append("")
        lines.append(f"  VIOLATIONS ({len(violations)}):")
        for viol in violations[:max_violations]:
            lines.append(f"    {viol.kind:<16} {viol.stream}: {viol.detail}")
        if len(violations) > max_violations:
            lines.append(f"    ... and {len(violations) - max_violations} more")
    if result.data_dir:
        lines.append(f"  data kept in {result.data_dir}")
    lines.append("RESULT: " + ("PASS" if result.passed else f"FAIL ({len(violations)} violations)"))
    return "\n".join(lines)
