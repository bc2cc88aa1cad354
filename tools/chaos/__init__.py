"""`ds-cluster chaos`: launch a cluster, write and read through it while shards are
SIGKILLed and SIGSTOPped, then verify that nothing acknowledged was lost, duplicated or
reordered and that every live reader saw a gap-free, duplicate-free sequence.

Modules: `payload` (message ids and encodings), `sse` (SSE parsing), `workload`
(idempotent writers, live readers, forks), `faults` (signals and unavailability),
`verify` (pure verdict), `report` (progress and summary), `runner` (the phases),
`process_cluster` (`ds-cluster up` as a child process, for supervisor kills), `scaling`
(changes of the shard count while the load runs).
"""

from __future__ import annotations

import argparse
import sys

import trio

from .runner import ChaosOptions, exit_code, run_chaos
from .scaling import parse_counts, parse_range

__all__ = ["ChaosOptions", "add_arguments", "run", "run_chaos"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ChaosOptions()
    a = parser.add_argument
    a("--duration", type=float, default=d.duration, help="seconds of faults and load (%(default)s)")
    a("--shards", type=int, default=d.shards, help="shards to launch (%(default)s)")
    a(
        "--kill-interval",
        type=float,
        default=d.kill_interval,
        help="mean seconds between faults; 0 = no faults (%(default)s)",
    )
    a(
        "--kill-supervisor-interval",
        type=float,
        default=d.kill_supervisor_interval,
        help="mean seconds between SIGKILLs of the supervisor itself, each followed by a new "
        "`up` on the same data dir; the supervisor then runs as a child process; "
        "0 = never (%(default)s)",
    )
    a(
        "--scale-interval",
        type=float,
        default=d.scale_interval,
        help="mean seconds between changes of the shard count (`ds-cluster scale` through the "
        "supervisor's control socket); 0 = never (%(default)s)",
    )
    a(
        "--scale-range",
        default=None,
        metavar="LO:HI",
        help="shard counts the scaling stays within (default: --shards to --shards + 1)",
    )
    a(
        "--scale-to",
        default=None,
        metavar="N,M,...",
        help="scale to these counts in turn (one every --scale-interval), then no more",
    )
    a("--seed", type=int, default=None, help="random seed (printed when not given)")
    a(
        "--stop-probability",
        type=float,
        default=d.stop_probability,
        help="share of faults that SIGSTOP a shard for 1-4 s instead of killing it (%(default)s)",
    )
    a("--streams-per-shard", type=int, default=d.streams_per_shard, help="(%(default)s)")
    a("--forks", type=int, default=None, help="cross-shard forks (default: one per shard)")
    a(
        "--write-pause",
        type=float,
        default=d.write_pause,
        help="mean seconds a writer waits between writes (%(default)s)",
    )
    a("--long-poll-timeout", type=float, default=d.long_poll_timeout, help="(%(default)s)")
    a("--sse-max-duration", type=float, default=d.sse_max_duration, help="(%(default)s)")
    a(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="seconds before a request's outcome counts as unknown (%(default)s)",
    )
    a(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="seconds allowed for finishing writes, recovery and reader catch-up (%(default)s)",
    )
    a("--progress-interval", type=float, default=d.progress_interval, help="(%(default)s)")
    a("--url", default=None, help="exercise an already running server instead (no faults)")
    a("--data-dir", default=None, help="cluster data directory (default: a temporary one)")
    a("--keep-data", action="store_true", help="keep the data directory even on success")
    a("--report-json", default=None, metavar="FILE", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    if args.scale_range is not None or args.scale_to is not None:
        try:
            parse_range(args.scale_range or "1:2")
            parse_counts(args.scale_to or "1")
        except ValueError as bad_range:
            print(f"ds-cluster chaos: {bad_range}", file=sys.stderr)
            return 2
    if args.scale_interval > 0 and args.url:
        print("ds-cluster chaos: --scale-interval needs a cluster of its own (no --url)")
        return 2
    options = ChaosOptions(
        duration=args.duration,
        shards=args.shards,
        kill_interval=args.kill_interval,
        kill_supervisor_interval=args.kill_supervisor_interval,
        scale_interval=args.scale_interval,
        scale_range=args.scale_range,
        scale_to=args.scale_to,
        seed=args.seed,
        stop_probability=args.stop_probability,
        streams_per_shard=args.streams_per_shard,
        forks=args.forks,
        write_pause=args.write_pause,
        long_poll_timeout=args.long_poll_timeout,
        sse_max_duration=args.sse_max_duration,
        request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout,
        progress_interval=args.progress_interval,
        url=args.url,
        data_dir=args.data_dir,
        keep_data=args.keep_data,
        report_json=args.report_json,
    )
    from ds_cluster.supervisor.cluster import SupervisorError

    result = None
    try:
        result = trio.run(run_chaos, options)
    except* SupervisorError as group:
        for exc in group.exceptions:
            print(f"ds-cluster chaos: the cluster did not start: {exc}", file=sys.stderr)
    return 2 if result is None else exit_code(result)
