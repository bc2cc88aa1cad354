"""`ds-cluster rebalance`: move shards onto a new ring without a supervisor (Kubernetes).

    ds-cluster rebalance --shard-endpoints shard-0=HOST:PORT,shard-1=HOST:PORT,... \
        --cluster-secret-file FILE [--ring-version auto|N]

`--shard-endpoints` is the new ring: every shard that is to own streams afterwards (or
`--shard-dns-pattern 'ds-shard-{i}.ds-shard:7000' --shard-count N`, as in Kubernetes).
Shards that leave are found in the ring the current shards hold, and drained. With
`--ring-version auto` (the default) the version is one above the newest ring any shard
holds, or that ring itself when it already is this one (a rerun waits for its moves).
Exits 0 once every shard, leaving ones included, reports done: leaving shards may then
be stopped. Exits 1 when the moves stall or a newer ring exists, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio

from ds_cluster.common import rpc_security
from ds_cluster.common.ring import Ring
from ds_cluster.common.shard_pattern import add_pattern_arguments, shard_endpoints
from ds_cluster.supervisor.rebalance import (
    STALL_TIMEOUT,
    Progress,
    RebalanceError,
    current_rings,
    plan_ring,
    rebalance,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-endpoints",
        default="",
        metavar="ID=HOST:PORT,...",
        help="every shard of the new ring, with its RPC address",
    )
    add_pattern_arguments(parser)  # or the new ring's shards by their DNS names and count
    parser.add_argument(
        "--ring-version",
        default="auto",
        metavar="auto|N",
        help="the new ring's version (default: auto, one above the newest ring held)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=STALL_TIMEOUT,
        metavar="S",
        help="fail when nothing moved for this long (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="progress as JSON lines")
    parser.add_argument("--log-level", default="WARNING", help="(default: %(default)s)")
    rpc_security.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s rebalance %(levelname)s %(name)s: %(message)s",
    )
    try:
        endpoints = shard_endpoints(args.shard_endpoints, args, flag="--shard-endpoints")
        if not endpoints:
            raise ValueError("no shard: give --shard-endpoints or --shard-dns-pattern")
        version = None if args.ring_version == "auto" else int(args.ring_version)
        if version is not None and version < 1:
            raise ValueError("--ring-version must be auto or a positive integer")
        security = rpc_security.from_args(args, server=False)
    except (ValueError, rpc_security.SecurityError) as exc:
        print(f"ds-cluster rebalance: {exc}", file=sys.stderr)
        return 2
    try:
        final = trio.run(_rebalance, endpoints, version, security, args)
    except RebalanceError as exc:
        print(f"ds-cluster rebalance: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        print(
            f"done: every shard serves on ring v{final.ring.version}; moved "
            f"{final.moved_streams} streams in {final.elapsed:.1f} s",
            flush=True,
        )
    return 0


async def _rebalance(
    endpoints: dict[str, tuple[str, int]],
    version: int | None,
    security: rpc_security.RpcSecurity,
    args: argparse.Namespace,
) -> Progress:
    if version is None:
        rings = await current_rings(
            endpoints, secret=security.secret, ssl_context=security.client_ssl
        )
        if not rings:
            raise RebalanceError("no shard answered ring_get: nothing to rebalance")
        ring = plan_ring(rings, tuple(endpoints), endpoints)
    else:
        ring = Ring(version, tuple(endpoints), endpoints)
    said: list[object] = [None]

    def report(progress: Progress) -> None:
        figures = progress.to_json()
        key = {k: v for k, v in figures.items() if k != "elapsed"}
        if key == said[0]:
            return
        said[0] = key
        print(json.dumps(figures) if args.json else progress.line(), flush=True)

    return await rebalance(
        endpoints,
        ring,
        report,
        secret=security.secret,
        ssl_context=security.client_ssl,
        stall_timeout=args.stall_timeout,
    )
