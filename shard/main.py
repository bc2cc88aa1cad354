"""`ds-cluster shard`: one shard process (store, service, RPC server, fork peers)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import signal
import sys
from pathlib import Path

import trio

from ds_cluster.common import gc_tuning, logs, rpc_security, watchdog
from ds_cluster.common.limits import raise_open_file_limit
from ds_cluster.common.ring import Ring, parse_listen
from ds_cluster.common.rpc_client import ShardPool
from ds_cluster.common.shard_pattern import add_pattern_arguments, shard_endpoints
from ds_cluster.shard import rpc_ops
from ds_cluster.shard.core.model import CoreConfig
from ds_cluster.shard.dirlock import DataDirBusy, DataDirLock
from ds_cluster.shard.ring_state import ShardRing
from ds_cluster.shard.rpc_server import RpcServer
from ds_cluster.shard.service import ShardService
from ds_cluster.shard.store import Store

log = logging.getLogger("shard")

EXIT_DATA_DIR_BUSY = 3  # another live process holds the data dir's lock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", required=True, help="this shard's id in the ring")
    parser.add_argument("--listen", required=True, help="HOST:PORT for RPC")
    parser.add_argument("--data-dir", required=True, type=Path, help="directory for shard.db")
    parser.add_argument(
        "--peers", default="", help="ID=HOST:PORT,... of every shard in the ring (may include self)"
    )
    add_pattern_arguments(parser)  # or the peers by their DNS names and count
    parser.add_argument("--ring-version", type=int, default=1)
    parser.add_argument("--long-poll-timeout", type=float, default=30.0, metavar="S")
    parser.add_argument("--sse-max-duration", type=float, default=60.0, metavar="S")
    parser.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite synchronous mode; NORMAL may lose the last commits on power loss",
    )
    parser.add_argument("--log-level", default="INFO")
    logs.add_arguments(parser)
    rpc_security.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    raise_open_file_limit()
    logs.setup("shard", args.id, level=args.log_level, log_format=args.log_format)
    try:
        args.security = rpc_security.from_args(args, server=True)
        shard_endpoints(args.peers, args, flag="--peers")  # a bad list is refused here
    except (rpc_security.SecurityError, ValueError) as exc:
        print(f"ds-cluster shard {args.id}: {exc}", file=sys.stderr)
        return 2
    # Before anything touches SQLite: a second process on these files corrupts them.
    try:
        lock = DataDirLock.acquire(args.data_dir)
    except DataDirBusy as exc:
        print(f"ds-cluster shard {args.id}: refusing to start: {exc}", file=sys.stderr)
        return EXIT_DATA_DIR_BUSY
    except OSError as exc:  # no lock file can be made: no storage to serve from at all
        print(f"ds-cluster shard {args.id}: cannot lock its data dir: {exc}", file=sys.stderr)
        return 1
    try:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve, args)
    finally:
        lock.release()
    return 0


async def serve(args: argparse.Namespace) -> None:
    host, port = parse_listen(args.listen)
    watchdog.install(args.id)  # logs event-loop stalls over 100 ms
    endpoints = shard_endpoints(args.peers, args, flag="--peers")
    peers = {sid: ep for sid, ep in endpoints.items() if sid != args.id}
    ring = Ring(args.ring_version, (args.id, *peers), endpoints)
    config = CoreConfig(
        long_poll_timeout=args.long_poll_timeout, sse_max_duration=args.sse_max_duration
    )
    store = Store(args.data_dir, synchronous=args.synchronous)
    # The newer of this ring and the one in the database wins (at start-up, shard.ring_state)
    rings = ShardRing(args.id, ring, store)
    try:
        security: rpc_security.RpcSecurity = args.security
        async with ShardPool(
            {**rings.stored_endpoints(), **peers},
            ring,
            role="shard",
            name=args.id,
            secret=security.secret,
            ssl_context=security.client_ssl,
            drop_departed=False,  # a shard that leaves the ring may still hand over streams
        ) as pool:
            rings.on_change.append(lambda old, new: _follow(pool, new))
            service = ShardService(args.id, rings, store, config, pool, secret=security.secret)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                await nursery.start(service.run)
                server = RpcServer(
                    service,
                    rpc_ops.handlers(service),
                    secret=security.secret,
                    ssl_context=security.server_ssl,
                )
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, server.serve, port, host=host)
                )
                gc_tuning.tune_for_serving()  # the start-up heap is built
                bound = listeners[0].socket.getsockname()
                log.info(
                    "serving on %s:%s (ring v%d: %s)",
                    bound[0],
                    bound[1],
                    service.ring.version,
                    ",".join(service.ring.shard_ids),
                )
    finally:
        store.close()
        log.info("stopped")


def _follow(pool: ShardPool, ring: Ring) -> None:
    """The RPC pool follows the shard's ring (it connects to the new shards)."""
    pool.adopt(ring)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
