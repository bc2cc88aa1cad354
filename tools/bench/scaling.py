"""Scaling matrix: append throughput of `ds-cluster up` over shard and gateway counts.

    ds-cluster bench --scaling 1,2,4 [--scaling-gateways 1,2,4] [--duration S] [--rounds R]

For every (shards S, gateways G) the bench starts `up:SxG`, runs the `append` scenario
(read-back included) R times and reports req/s with the CPU each kind of process spent per
acknowledged append: gateway, shard event loop (the shard's main thread: RPC, protocol core,
hub) and shard commit threads (SQLite writes plus fsync, run off the loop by the group
committer). Why per kind: the 16-core estimate scales each kind's cost separately, so the
measured split is what it rests on. CPU is taken over the whole run (stream set-up and
read-back included, a few percent of the requests), so it is a slight upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .append import run_append
from .procs import cmdline, cpu_seconds
from .targets import BenchTarget


def _thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds of one thread (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _kinds(pids: list[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        cmd = cmdline(pid)
        out[pid] = "gateway" if " gateway " in cmd else "shard" if " shard " in cmd else "other"
    return out


def _snapshot(kinds: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far per kind; a shard's main thread is its loop, the rest commits."""
    cpu = {"gateway": 0.0, "shard_loop": 0.0, "shard_commit": 0.0, "other": 0.0}
    for pid, kind in kinds.items():
        total = cpu_seconds(pid)
        if kind == "shard":
            main = _thread_cpu(pid, pid)
            cpu["shard_loop"] += main
            cpu["shard_commit"] += total - main  # includes threads that already exited
        else:
            cpu[kind] += total
    return cpu


def run_scaling(args: argparse.Namespace) -> int:
    shard_counts = [int(x) for x in args.scaling.split(",") if x]
    gateway_counts = [int(x) for x in (args.scaling_gateways or args.scaling).split(",") if x]
    rows: list[dict[str, Any]] = []
    for s in shard_counts:
        for g in gateway_counts:
            bt = BenchTarget(f"up:{s}x{g}", None, args.log_dir)
            bt.start()
            try:
                time.sleep(1.0)  # let every gateway connect to every shard
                kinds = _kinds(bt.pids())
                found = (
                    sum(k == "shard" for k in kinds.values()),
                    sum(k == "gateway" for k in kinds.values()),
                )
                if found != (s, g):
                    print(f"# up:{s}x{g}: found {found} (shards, gateways)", file=sys.stderr)
                for rnd in range(args.rounds):
                    print(f"# scaling up:{s}x{g} round {rnd + 1} ...", file=sys.stderr)
                    c0, t0 = _snapshot(kinds), time.monotonic()
                    m = run_append(
                        bt.target,
                        f"sc{s}x{g}",
                        f"r{rnd}",
                        "bytes",
                        args.connections,
                        args.streams,
                        args.duration,
                        args.processes,
                        verify_data=not args.no_verify,
                        driver=args.append_driver,
                        wrk_threads=args.wrk_threads,
                    )
                    c1, elapsed = _snapshot(kinds), time.monotonic() - t0
                    n = m["requests_per_s"] * args.duration
                    row = {"shards": s, "gateways": g, "round": rnd, **m}
                    for k in ("gateway", "shard_loop", "shard_commit"):
                        row[f"{k}_ms_per_req"] = 1000.0 * (c1[k] - c0[k]) / n if n else 0.0
                    row["server_cpu_pct"] = 100.0 * sum(c1[k] - c0[k] for k in c1) / elapsed
                    rows.append(row)
            finally:
                bt.stop()

    cols = [
        ("shards", "S"),
        ("gateways", "G"),
        ("requests_per_s", "req/s"),
        ("p99_ms", "p99 ms"),
        ("errors", "errors"),
        ("verify_problems", "verify"),
        ("gateway_ms_per_req", "gw ms/req"),
        ("shard_loop_ms_per_req", "shard loop ms/req"),
        ("shard_commit_ms_per_req", "commit ms/req"),
        ("client_cpu_pct", "client cpu%"),
        ("server_cpu_pct", "server cpu%"),
    ]
    # one line per (S, G): the mean over rounds
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    bad = False
    for s in shard_counts:
        for g in gateway_counts:
            rs = [r for r in rows if r["shards"] == s and r["gateways"] == g]
            cells = []
            for key, _ in cols:
                vals = [r.get(key, 0) for r in rs]
                v = sum(vals) / len(vals) if vals else float("nan")
                if key in ("shards", "gateways"):
                    cells.append(str(int(v)))
                elif key.endswith("ms_per_req"):
                    cells.append(f"{v:.3f}")
                elif key in ("errors", "verify_problems"):
                    cells.append(str(int(sum(vals))))
                    bad = bad or sum(vals) > 0
                else:
                    cells.append(f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}")
            print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"command": "ds-cluster " + " ".join(sys.argv[1:]), "runs": rows},
                f,
                indent=1,
                default=str,
            )
    return 1 if bad else 0
