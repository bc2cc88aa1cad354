"""`ds-cluster bench`: measure a Durable Streams server, optionally side by side with others.

Scenarios (each bounded in time; connection counts are flags):
  append       64 connections POST 100-byte octet-stream bodies over 256 streams; every
               stream is then read back and compared with the acknowledged bodies
  json         the same with one small JSON message per POST
  json-batch   the same with JSON arrays of 10 messages per POST
  catchup      32 connections GET ?offset=-1 of 8 streams of 1 MiB, following
               Stream-Next-Offset: MB/s
  longpoll     1,000 long-poll readers over 10 streams, one steady writer at 50 msg/s:
               e2e latency (shape from the --fanout-* flags)
  sse          the same with SSE readers
  longpoll-1000, longpoll-500, sse-1000, sse-500
               fixed shapes: 1,000 readers / 10 streams / 50 msg/s and 500 readers /
               50 streams / 100 msg/s (tools/bench/presets.py)
  idle         N idle SSE connections held: count and server RSS per connection

--preset goals runs append, catchup, the four fixed fan-out shapes and idle.

--scaling 1,2,4 instead runs the append scenario on `up:SxG` for every shard count S and
gateway count G (--scaling-gateways, default the same list) with CPU per request per process
kind; --url is then not needed (see tools/bench/scaling.py).

Targets: --url is A ("ours"); each --vs adds one (see tools/bench/targets.py for the spec
forms: an http:// or https:// URL, ref:file, ref:memory, rakaia, baseline[:W], up, up:S[xG],
and up[:S[xG]]:normal, which isolates the cost of fsync). Every request of every scenario to
every target carries the --header lines (e.g. a bearer token for a server with client auth;
a server without it ignores the header); https URLs are verified against --cacert. Runs
alternate per scenario (A B A B ... for --rounds 2) so machine noise spreads over all;
ratios are A / other, per round pair, geometric mean. The append scenarios run under wrk
when it is on PATH (tools/bench/wrk.py; --append-driver wrk|python picks one), the others
and the Python append driver in separate Python processes on raw keep-alive sockets. The
load generators' CPU (client_cpu_pct, % of one core) and the servers' CPU (server_cpu_pct;
over the load window for the append scenarios, over the whole run otherwise) are reported so
a saturated client or server is visible.

Output: a detailed table (medians over the rounds, and A / other per round pair), then a
markdown summary of the headline figures with a last column "ours vs best peer"
(tools/bench/report.py); --json FILE writes both and every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import signal
import sys
import time
import uuid
from typing import Any

from .presets import FANOUT_PRESETS, PRESETS, SCENARIOS, fanout_shape, is_fanout, selected

# writer_rate: a server too slow to take the writer's steady rate gets fewer messages
_FANOUT_METRICS = [
    "p50_ms",
    "p99_ms",
    "writer_rate",
    "delivered",
    "expected",
    "lost",
    "duplicates",
    "errors",
]

# metrics shown in the table, per scenario (everything goes into --json)
SHOWN = {
    "append": [
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "errors",
        "verify_problems",
        "client_cpu_pct",
        "server_cpu_pct",
        "server_cpu_us_per_append",
    ],
    "json": ["requests_per_s", "p50_ms", "p99_ms", "errors", "verify_problems"],
    "json-batch": ["requests_per_s", "messages_per_s", "p99_ms", "errors", "verify_problems"],
    "catchup": ["mb_per_s", "errors", "client_cpu_pct", "server_cpu_pct"],
    "longpoll": _FANOUT_METRICS,
    "sse": _FANOUT_METRICS,
    "idle": ["held", "kib_per_conn", "rss_held_kib", "open_failures"],
    **{name: _FANOUT_METRICS for name in FANOUT_PRESETS},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        help="target A (URL, ref:file|memory, rakaia, baseline, up, up:S[xG], up[:S[xG]]:normal)",
    )
    p.add_argument("--vs", action="append", default=[], help="another target (repeatable)")
    p.add_argument(
        "--scenario",
        action="append",
        default=[],
        help=f"scenario(s), comma-separated or repeated, from {SCENARIOS} (default: the first 7)",
    )
    p.add_argument(
        "--preset",
        action="append",
        default=[],
        choices=sorted(PRESETS),
        help="a named set of scenarios (goals: those of docs/performance.md's goals)",
    )
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    p.add_argument("--processes", type=int, default=2, help="client processes per scenario")
    p.add_argument(
        "--append-driver",
        choices=["wrk", "python"],
        help="what drives the append scenarios (default: wrk when it is on PATH)",
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=2,
        help="wrk threads; the connections are split evenly over them (default 2)",
    )
    p.add_argument("--connections", type=int, default=64, help="append connections")
    p.add_argument("--streams", type=int, default=256, help="append streams")
    p.add_argument("--catchup-streams", type=int, default=8)
    p.add_argument("--catchup-size", type=int, default=1 << 20, help="bytes per stream")
    p.add_argument("--catchup-readers", type=int, default=32, help="connections")
    p.add_argument("--fanout-readers", type=int, default=1000)
    p.add_argument("--fanout-streams", type=int, default=10)
    p.add_argument("--fanout-rate", type=float, default=50.0, help="writer messages/s")
    p.add_argument("--idle-connections", type=int, default=20000)
    p.add_argument("--idle-hold", type=float, default=5.0, help="seconds to hold them")
    p.add_argument(
        "--pids",
        default="",
        help="comma-separated server PIDs of target A (default: found from its port)",
    )
    p.add_argument("--log-dir", default=None, help="where managed servers log (default: none)")
    p.add_argument("--no-verify", action="store_true", help="skip append read-back checks")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="restart the managed targets before each scenario (no state, or handlers a "
        "server failed to end, carried over from the scenarios before)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a header sent with every request to every target (repeatable)",
    )
    p.add_argument("--cacert", metavar="FILE", help="CA certificate(s) that verify https targets")
    p.add_argument("--scaling", metavar="S,...", help="append matrix over up:SxG shard counts")
    p.add_argument("--scaling-gateways", metavar="G,...", help="gateway counts (default: S list)")


def _scenarios(args: argparse.Namespace) -> list[str]:
    return selected(args.scenario, args.preset)


def _run_one(scenario: str, bt: Any, args: argparse.Namespace, run_id: str, tag: str) -> dict:
    from .append import run_append
    from .catchup import run_catchup
    from .fanout import run_fanout
    from .idle import run_idle
    from .procs import cpu_seconds

    t = bt.target
    pids = bt.pids()
    cpu0 = {p: cpu_seconds(p) for p in pids}
    t0 = time.monotonic()
    if scenario in ("append", "json", "json-batch"):
        mode = {"append": "bytes", "json": "json", "json-batch": "json10"}[scenario]
        if bt.kind == "sink":
            mode = "sink"
        m = run_append(
            t,
            run_id,
            tag,
            mode,
            args.connections,
            args.streams,
            args.duration,
            args.processes,
            verify_data=not args.no_verify,
            pids=pids,
            driver=args.append_driver,
            wrk_threads=args.wrk_threads,
        )
    elif scenario == "catchup":
        m = run_catchup(
            t,
            run_id,
            tag,
            args.catchup_streams,
            args.catchup_size,
            args.catchup_readers,
            args.duration,
            args.processes,
        )
    elif is_fanout(scenario):
        shape = fanout_shape(scenario, args)
        m = run_fanout(
            t,
            run_id,
            tag,
            shape.mode,
            shape.readers,
            shape.streams,
            shape.rate,
            args.duration,
            args.processes,
        )
    else:
        m = run_idle(t, run_id, tag, args.idle_connections, args.idle_hold, pids)
    elapsed = time.monotonic() - t0
    if pids and "server_cpu_pct" not in m:
        used = sum(cpu_seconds(p) - cpu0[p] for p in pids)
        # Over the whole run, setup and read-back included (which dilute it): the append
        # scenarios measure it over their load window instead.
        m["server_cpu_pct"] = 100.0 * used / elapsed
    m["server_pids"] = pids
    return m


def _ratio(a: Any, b: Any) -> float:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return a / b
    return math.nan


def run(args: argparse.Namespace) -> int:
    from .http import parse_header
    from .procs import machine
    from .rakaia import TargetUnavailable
    from .report import fmt, markdown, median_metric, summary
    from .stats import geomean
    from .targets import BenchTarget
    from .wrk import choose_driver

    scenarios = _scenarios(args)
    if any(s in ("append", "json", "json-batch") for s in scenarios) or args.scaling:
        args.append_driver = choose_driver(args.append_driver)
    if args.scaling:
        from .scaling import run_scaling

        return run_scaling(args)
    if not args.url:
        raise SystemExit("--url is required (or --scaling)")
    try:
        headers = tuple(parse_header(h) for h in args.header)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    run_id = uuid.uuid4().hex[:8]
    pids_a = [int(x) for x in args.pids.split(",") if x]
    specs = [args.url, *args.vs]
    targets = [
        BenchTarget(s, pids_a if i == 0 else None, args.log_dir, headers, args.cacert)
        for i, s in enumerate(specs)
    ]
    results: dict[str, dict[str, list[dict]]] = {s: {} for s in scenarios}
    started = datetime.datetime.now(datetime.UTC)
    # A bench that is terminated must still stop the servers it started (in their own
    # sessions, so a signal to the bench's group does not reach them): SystemExit unwinds
    # through the `finally` below.
    previous_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    host = machine()
    print(
        f"# machine: {host['cpu_model']}, {host['cpus']} CPUs, {host['memory_gib']} GiB, "
        f"Linux {host['kernel']}, Python {host['python']}",
        file=sys.stderr,
    )
    try:
        for bt in targets:
            try:
                bt.start()
            except TargetUnavailable as exc:
                raise SystemExit(f"bench: {exc}") from None
            print(f"# target {bt.label}: {bt.target.base} pids={bt.pids()}", file=sys.stderr)
        for n, scenario in enumerate(scenarios):
            if args.fresh and n > 0:
                for bt in targets:
                    bt.restart()
                    print(f"# restarted {bt.label}: pids={bt.pids()}", file=sys.stderr)
            for rnd in range(args.rounds):
                for i, bt in enumerate(targets):
                    if bt.kind == "sink" and scenario != "append":
                        continue
                    tag = f"{scenario}-r{rnd}-t{i}"
                    print(f"# {scenario} round {rnd + 1} on {bt.label} ...", file=sys.stderr)
                    try:
                        m = _run_one(scenario, bt, args, run_id, tag)
                    except Exception as exc:  # one failed run must not lose the others
                        m = {"run_error": f"{type(exc).__name__}: {exc}"}
                        print(f"#   FAILED: {m['run_error']}", file=sys.stderr)
                    results[scenario].setdefault(bt.label, []).append(m)
    finally:
        for bt in targets:
            bt.stop()
        signal.signal(signal.SIGTERM, previous_sigterm)

    labels = [bt.label for bt in targets]
    a = labels[0]
    table: list[dict[str, Any]] = []
    for scenario in scenarios:
        for metric in SHOWN[scenario]:
            row: dict[str, Any] = {"scenario": scenario, "metric": metric}
            for lab in labels:
                row[lab] = median_metric(results[scenario].get(lab, []), metric)
            for lab in labels[1:]:
                ra = results[scenario].get(a, [])
                rb = results[scenario].get(lab, [])
                pairs = [_ratio(x.get(metric), y.get(metric)) for x, y in zip(ra, rb, strict=False)]
                row[f"{a}/{lab}"] = geomean(pairs) if pairs else math.nan
                row[f"{a}/{lab} per round"] = pairs
            table.append(row)

    cols = ["scenario", "metric", *labels, *[f"{a}/{lab}" for lab in labels[1:]]]
    cells = [[fmt(r.get(c, "")) for c in cols] for r in table]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)))
    headline = summary(results, labels, scenarios, args)
    print()
    print(markdown(headline, labels))
    failures = [
        (s, lab, m.get("failed") or m["run_error"])
        for s in scenarios
        for lab, ms in results[s].items()
        for m in ms
        if "failed" in m or "run_error" in m
    ]
    for s, lab, why in failures:
        print(f"FAILED {s} on {lab}: {why}")
    if args.json:
        doc = {
            "command": "ds-cluster " + " ".join(sys.argv[1:]) if sys.argv else "",
            "started": started.isoformat(timespec="seconds"),
            "cpus": host["cpus"],
            "machine": host,
            "targets": labels,
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "table": table,
            "summary": headline,
            "runs": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    bad = failures or any(
        isinstance(r.get(lab), float)
        and r["metric"] in ("verify_problems", "lost", "duplicates")
        and r[lab] > 0
        for r in table
        for lab in labels
    )
    return 1 if bad else 0
