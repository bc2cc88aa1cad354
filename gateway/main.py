"""`ds-cluster gateway`: serve HTTP on trio (`gateway.server`, `gateway.http1`), route to shards.

The listening socket is bound here (with SO_REUSEPORT under --reuse-port, so several
gateway processes can share one port and the kernel spreads connections over them) and
served by `gateway.server.serve`. Once it listens, one line goes to stderr:
`ds-cluster gateway listening on http://HOST:PORT` (https with --tls-cert/--tls-key;
with the real port when 0 was asked). SIGINT/SIGTERM: stop accepting, give requests in
flight hypercorn's graceful timeout, close the shard connections, exit 0. SIGHUP: reload
what can be reloaded (the TLS certificate, the auth files) and go on.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial

import trio
from hypercorn.config import Config

from ds_cluster.common import gc_tuning, logs, rpc_security, watchdog
from ds_cluster.common.limits import raise_open_file_limit
from ds_cluster.common.ring import Ring, parse_listen
from ds_cluster.common.rpc_client import ShardPool
from ds_cluster.common.shard_pattern import add_pattern_arguments, shard_endpoints
from ds_cluster.gateway import auth_files, body_cache, tls
from ds_cluster.gateway import metrics as gateway_metrics
from ds_cluster.gateway.access import AccessLog, with_request_ids
from ds_cluster.gateway.app import create_app
from ds_cluster.gateway.budget import (
    MAX_CONNECTION_OUTPUT,
    MAX_PROCESS_OUTPUT,
    RPC_MAX_BUFFERED,
    OutputBudget,
)
from ds_cluster.gateway.server import LeanConfig, serve

DEFAULT_MAX_BODY = 64 * 1024 * 1024
LISTEN_BACKLOG = 1024  # connections the kernel queues before we accept them
KEEP_ALIVE_MAX_REQUESTS = 1 << 62  # requests one connection may make: no limit
log = logging.getLogger("gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--shards", default="", metavar="ID=HOST:PORT,...", help="every shard of the ring"
    )
    add_pattern_arguments(parser)  # or the shards by their DNS names and count
    parser.add_argument("--ring-version", type=int, default=1)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    parser.add_argument(
        "--body-cache-bytes",
        type=int,
        default=body_cache.DEFAULT_BYTES,
        metavar="N",
        help="large catch-up bodies kept, so a hot one is not sent by its shard again "
        "(bytes; 0: off)",
    )
    parser.add_argument("--reuse-port", action="store_true", help="set SO_REUSEPORT")
    parser.add_argument(
        "--access-log", action="store_true", help="log every request (logger `access`)"
    )
    parser.add_argument("--log-level", default="INFO")
    logs.add_arguments(parser)
    tls.add_arguments(parser)
    parser.add_argument(
        "--graceful-timeout", type=float, default=3.0, help="seconds to finish in-flight work"
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=LeanConfig.idle_timeout,
        metavar="S",
        help="seconds a connection may wait between requests (keep it above the idle "
        "timeout of clients and load balancers in front)",
    )
    parser.add_argument(
        "--public-url",
        default=os.environ.get("DS_PUBLIC_URL", ""),
        metavar="URL",
        help="scheme://host[:port] clients reach this gateway at, for Location headers "
        "(env DS_PUBLIC_URL; default: the listen address)",
    )
    parser.add_argument(
        "--max-output-bytes",
        type=int,
        default=MAX_PROCESS_OUTPUT,
        help="response bytes all clients together may have queued before laggards are dropped",
    )
    parser.add_argument(
        "--max-connection-output-bytes",
        type=int,
        default=MAX_CONNECTION_OUTPUT,
        help="response bytes one connection may have queued before it is dropped",
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="record no metrics and serve no /metrics (to measure what they cost)",
    )
    rpc_security.add_arguments(parser)
    add_auth_arguments(parser)


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """Client authentication (off unless a file is given); see docs/auth.md."""
    parser.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="require bearer tokens from this JSON file on stream requests "
        "(reloaded when it changes, and on SIGHUP)",
    )
    parser.add_argument(
        "--auth-jwt-key",
        metavar="FILE",
        help="also accept JWTs signed with this key: an HS256 secret, a PEM public key "
        "(RSA, EC, Ed25519) or a JWKS",
    )
    parser.add_argument(
        "--auth-metrics",
        action="store_true",
        help="/metrics needs a token with the metrics right (default: open)",
    )


def public_url(given: str, bound: tuple[str, int], scheme: str = "http") -> str:
    """The gateway's public base URL: `given` (checked), else the listen address."""
    if not given:
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        return f"{scheme}://{host}:{bound[1]}"
    scheme, sep, rest = given.partition("://")
    if scheme not in ("http", "https") or not sep or not rest.strip("/") or "/" in rest.strip("/"):
        raise ValueError(f"--public-url {given!r}: expected http(s)://host[:port]")
    return given.rstrip("/")


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def hypercorn_config(
    *, graceful_timeout: float, idle_timeout: float = LeanConfig.idle_timeout
) -> Config:
    """Hypercorn's own access log stays off: `gateway.access` writes ours."""
    config = LeanConfig()
    config.accesslog = None
    config.ssl_handshake_timeout = tls.HANDSHAKE_TIMEOUT
    config.errorlog = logging.getLogger("hypercorn.error")  # via our root handler, once
    config.include_server_header = False
    config.graceful_timeout = graceful_timeout
    config.idle_timeout = idle_timeout
    config.backlog = LISTEN_BACKLOG
    # hypercorn closes a connection after 1,000 requests by default: a busy client then
    # pays a reconnect every second or so, and one that misses the Connection: close
    # loses a request. Node's server sets no such limit either.
    config.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    return config


async def serve_gateway(
    args: argparse.Namespace, endpoints: dict[str, tuple[str, int]], sock: socket.socket
) -> None:
    # The ring to start from, with every shard's address; the pool follows newer rings
    # the shards tell it of (`ShardPool.adopt`), without a restart.
    ring = Ring(args.ring_version, tuple(endpoints), endpoints)
    watchdog.install("gateway")  # logs event-loop stalls over 100 ms
    bound = sock.getsockname()
    server_tls: tls.ServerTLS | None = args.tls
    scheme = "http" if server_tls is None else "https"
    base = public_url(args.public_url, bound, scheme)
    output = OutputBudget(args.max_output_bytes, args.max_connection_output_bytes)
    config = hypercorn_config(
        graceful_timeout=args.graceful_timeout, idle_timeout=args.idle_timeout
    )
    access = AccessLog() if args.access_log else None
    sock.listen(config.backlog)
    listener: trio.SocketListener | tls.TLSListener
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    if server_tls is not None:
        listener = tls.TLSListener(listener, server_tls)
    reloaders: list[Callable[[], object]] = []  # what SIGHUP reloads
    if server_tls is not None:
        reloaders.append(server_tls.reload)
    name = f"gateway-{socket.gethostname()}-{os.getpid()}"
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        trio.open_signal_receiver(signal.SIGHUP) as hangups,
    ):

        async def shutdown_trigger() -> None:
            async for signum in signals:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                return

        async with (
            ShardPool(
                endpoints,
                ring,
                role="gateway",
                name=name,
                secret=args.security.secret,
                ssl_context=args.security.client_ssl,
                max_buffered=RPC_MAX_BUFFERED,
            ) as pool,
            trio.open_nursery() as shared,  # long-poll calls shared by clients
        ):
            auth: auth_files.AuthFiles | None = args.auth
            if auth is not None:
                auth.start(shared)
                reloaders.append(auth.reload_soon)
            app, stream = create_app(
                pool, ring, args.max_body_bytes, shared, base, auth, args.body_cache_bytes
            )
            app = with_request_ids(app, access)
            if not args.no_metrics:  # outermost: a request's duration includes the rest
                app = gateway_metrics.enable(pool, stream).instrument(app)
            shared.start_soon(_reload_on_hangup, hangups, reloaders)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(
                        serve,
                        app,
                        config,
                        [listener],
                        shutdown_trigger=shutdown_trigger,
                        native=stream,
                        output=output,
                        access=access,
                    )
                )
                gc_tuning.tune_for_serving()  # the start-up heap is built
                print(
                    f"ds-cluster gateway listening on {scheme}://{bound[0]}:{bound[1]}",
                    file=sys.stderr,
                    flush=True,
                )
            shared.cancel_scope.cancel()  # hypercorn is done: nobody waits on them


async def _reload_on_hangup(
    hangups: AsyncIterator[int], reloaders: list[Callable[[], object]]
) -> None:
    """SIGHUP: run every reloader (each logs what it did)."""
    async for _ in hangups:
        log.info("SIGHUP: reloading")
        for reload in reloaders:
            reload()


def run(args: argparse.Namespace) -> int:
    # Until the gateway serves, SIGHUP is ignored rather than fatal: start-up reads the
    # files it would reload anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise_open_file_limit()
    logs.setup("gateway", args.listen, level=args.log_level, log_format=args.log_format)
    try:
        args.tls = tls.ServerTLS.from_args(args)
        args.security = rpc_security.from_args(args, server=False)
        endpoints = shard_endpoints(args.shards, args, flag="--shards")
        if not endpoints:
            raise ValueError("no shard: give --shards or --shard-dns-pattern")
        host, port = parse_listen(args.listen)
        public_url(args.public_url, (host, port))  # refused before binding when malformed
        args.auth = auth_files.from_args(args.auth_tokens, args.auth_jwt_key, args.auth_metrics)
        if args.auth is not None:
            log.info("client auth on (%s)", args.auth.describe())
        sock = bind_socket(host, port, reuse_port=args.reuse_port)
    except (ValueError, OSError, rpc_security.SecurityError, tls.TLSError) as exc:
        print(f"ds-cluster gateway: {exc}", file=sys.stderr)
        return 2
    trio.run(serve_gateway, args, endpoints, sock)
    return 0
