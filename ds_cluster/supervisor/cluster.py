"""`ds-cluster up`: launch a local cluster (N shards, G gateways) and keep it running.

The supervisor owns child processes and nothing else: it never speaks the protocol. It
picks ports, starts every shard and gateway as a child of its own, restarts any child
that dies (with exponential backoff so a crash loop does not spin), and on cancellation
or SIGINT/SIGTERM stops them all (SIGTERM, then SIGKILL after a grace period).

Shard ids (`shard-0` .. `shard-{N-1}`) and their data directories (`DATA/shard-K`) are a
function of N alone. `DATA/cluster.json` (record.py) records the shards, the ring version
and each shard's port, so a cluster restarted on the same `--data-dir` finds its streams
and its addresses again (a ring names its shards' addresses, and shards remember it).

The shard count changes live (scaling.py): `ds-cluster scale` asks over the control
socket `DATA/supervisor.sock` (control.py), `up --shards N` on a dir recorded with
another count asks itself once ready. The supervisor then starts and stops shard
processes and drives the moves (rebalance.py); children restarted afterwards start on
the newest ring.

One owner per data dir: a supervisor holds `DATA/.supervisor.lock`, and each shard its
own `DATA/shard-K/shard.lock`. Children hold a lifeline to their supervisor and exit
when it dies, however it dies (`common/lifeline.py`); a new supervisor waits a few
seconds for such orphans to go, and refuses the data dir, naming the PIDs, if a shard
still holds it. Shards listen on `shard_host` (loopback by default) whatever `host` the
gateways are given.

Usable as a library (the chaos tool runs it in-process):

    supervisor = Supervisor(ClusterConfig(shards=2, port=0, data_dir=tmp))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(supervisor.run)
        ...
        nursery.cancel_scope.cancel()   # stops every child
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import trio

from ds_cluster.common import logs
from ds_cluster.common.lifeline import Lifeline
from ds_cluster.common.ring import Endpoint, Ring, format_endpoint
from ds_cluster.common.rpc_security import (
    SECRET_FILE_NAME,
    SecurityError,
    ensure_secret_file,
    read_secret_file,
)
from ds_cluster.supervisor import control, record
from ds_cluster.supervisor.rebalance import STALL_TIMEOUT, shard_states
from ds_cluster.supervisor.record import ClusterRecord, RecordError
from ds_cluster.supervisor.scaling import Scaler, ScaleRefused

log = logging.getLogger("ds_cluster.supervisor")
LOG_FORMATS = logs.FORMATS

_LOCK = ".supervisor.lock"
# Each shard holds an exclusive flock on DATA/shard-K/shard.lock for its whole life, with
# its PID inside; the OS drops it when the process dies.
SHARD_LOCK = "shard.lock"
# How a child stops once its supervisor is gone (see common/lifeline.py): a shard at once,
# by SIGKILL (what it acknowledged is committed); a gateway by SIGTERM, then SIGKILL
# after this many seconds if it is still finishing requests.
LIFELINE_GRACE = {"shard": 0.0, "gateway": 2.0}
# While waiting for a previous cluster's children to exit: the longest sleep between
# two looks at their locks or port (a PID we can watch wakes us sooner).
_OWNER_RECHECK = 0.25
DEFAULT_PORT = 4437  # the gateways' port unless told otherwise
# How often to look again where no event announces a change (a freed port, readiness),
# and how long one readiness probe may take.
_POLL_INTERVAL = 0.1
_READY_PROBE_TIMEOUT = 2.0


def default_shard_count() -> int:
    """One shard per core, at least two (so a local cluster always routes across shards)."""
    return max(2, os.cpu_count() or 2)


class SupervisorError(Exception):
    """The cluster cannot be started as configured (busy port, data dir mismatch, ...)."""


@dataclass
class ClusterConfig:
    """Everything `ds-cluster up` needs; plain values so tools can build one directly."""

    # None: the count the data dir records (default_shard_count() for a new one). Another
    # count than the recorded one starts the recorded cluster, then scales it (scaling.py).
    shards: int | None = None
    gateways: int = 1
    host: str = "127.0.0.1"  # the gateways' HTTP address
    port: int = DEFAULT_PORT  # 0: pick a free port
    # The shards' RPC address, apart from `host`: exposing the gateways must not also
    # expose the shards, which trust whoever reaches them as a cluster member.
    shard_host: str = "127.0.0.1"
    data_dir: Path = Path("./data")
    long_poll_timeout: float | None = None
    sse_max_duration: float | None = None
    synchronous: str | None = None  # "FULL" | "NORMAL"; None: the shard's default
    max_body_bytes: int | None = None  # gateways; None: the gateway's default
    log_level: str | None = None  # gateways and shards; None: their default
    log_format: str | None = None  # "text" | "json", every process; None: text
    access_log: bool = False  # gateways: log every request
    # Client auth on the gateways (docs/auth.md): a tokens file and/or a JWT key; None: off.
    auth_tokens: Path | None = None
    auth_jwt_key: Path | None = None
    auth_metrics: bool = False  # /metrics needs a token with the metrics right
    metrics: bool = True  # False: gateways record no metrics and serve no /metrics
    # HTTPS on the gateways (certificate chain and key, PEM); None: plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Where clients reach the gateways (for Location headers); None: the URL `up` prints.
    public_url: str | None = None
    # How to run `ds-cluster` in a child: the current interpreter, so a venv carries over.
    launcher: Sequence[str] = (sys.executable, "-m", "ds_cluster")
    # None: children inherit our stdout/stderr. A directory: each child appends to NAME.log.
    log_dir: Path | None = None
    ready_timeout: float = 60.0  # generous: a shard may be recovering a large WAL
    stop_grace: float = 5.0
    restart_initial_delay: float = 0.2
    restart_max_delay: float = 10.0
    # A child that stayed up this long before dying restarts at the initial delay again;
    # one that dies sooner (start-up takes well under a second) is in a crash loop.
    restart_reset_after: float = 3.0
    # How long a new supervisor waits for the children of a previous one (killed, say) to
    # exit before refusing the data dir or the port: they exit within LIFELINE_GRACE of
    # their supervisor's death.
    owner_wait: float = 5.0
    # A scale fails when no stream or byte moved for this long while moves remain.
    scale_stall_timeout: float = STALL_TIMEOUT
    print_scale_progress: bool = False  # `up` prints a scale's progress on its stdout

    def __post_init__(self) -> None:
        if self.shards is not None and self.shards < 1:
            raise ValueError("--shards must be at least 1")
        if self.shards is not None and self.shards > record.MAX_SHARDS:
            raise ValueError(f"--shards must be at most {record.MAX_SHARDS}")
        if self.gateways < 1:
            raise ValueError("--gateways must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be 0..65535")
        if self.synchronous is not None and self.synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError("--synchronous must be FULL or NORMAL")
        if self.max_body_bytes is not None and self.max_body_bytes < 1:
            raise ValueError("--max-body-bytes must be at least 1")
        for option, given in (
            ("--auth-tokens", self.auth_tokens),
            ("--auth-jwt-key", self.auth_jwt_key),
        ):
            # Checked here too (the content by the gateways, which refuse a bad one).
            if given is not None and not (Path(given).is_file() and os.access(given, os.R_OK)):
                raise ValueError(f"{option} {given}: not a readable file")
        if self.auth_metrics and self.auth_tokens is None and self.auth_jwt_key is None:
            raise ValueError("--auth-metrics needs --auth-tokens or --auth-jwt-key")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert is not None and self.tls_key is not None:
            # Checked here too: a gateway refusing them would only show as a crash loop.
            try:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"--tls-cert {self.tls_cert} / --tls-key: {exc}") from None
        if self.log_format is not None and self.log_format not in LOG_FORMATS:
            raise ValueError("--log-format must be text or json")
        if self.public_url is not None:
            # Checked here too: a gateway refusing it would only show as a crash loop.
            url = urlsplit(self.public_url)
            if url.scheme not in ("http", "https") or not url.hostname or url.path.strip("/"):
                raise ValueError(
                    f"--public-url {self.public_url!r}: expected http(s)://host[:port]"
                )
        self.data_dir = Path(self.data_dir)


@dataclass(frozen=True)
class RestartEvent:
    """One death of a child, as logged: who, how it ended, when it comes back."""

    name: str
    pid: int
    returncode: int | None  # negative: killed by signal -returncode; None: failed to spawn
    uptime: float
    delay: float
    at: float  # trio.current_time() of the death

    @property
    def how(self) -> str:
        if self.returncode is None:
            return "failed to start"
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exited with code {self.returncode}"


@dataclass
class _Child:
    name: str
    kind: str  # "shard" | "gateway"
    argv: list[str]
    process: trio.Process | None = None
    starts: int = 0
    retired: bool = False  # stopped for good (a shard that left the ring): not restarted


def _connect_host(host: str) -> str:
    """An address to reach a server bound on `host` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _peers(ring: Ring) -> str:
    """`ID=HOST:PORT,...` of a ring's shards, as `--peers` and `--shards` take them."""
    return ",".join(f"{sid}={format_endpoint(ep)}" for sid, ep in sorted(ring.endpoints.items()))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` now, outside the kernel's ephemeral range.

    Each child keeps its port across restarts. A port inside the ephemeral range can be
    taken while its server is down: by any outgoing connection, and even by a peer's
    reconnect attempt to that very port (TCP self-connect on loopback). Ports below the
    range are only ever taken by an explicit bind.
    """
    low, high = _ephemeral_range()
    candidates = list(range(10_000, low)) if low > 11_000 else []
    if not candidates and high < 65_000:
        candidates = list(range(high + 1, 65_536))
    random.shuffle(candidates)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    chosen: list[int] = []
    for port in candidates:
        if len(chosen) == count:
            break
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        chosen.append(port)
    if len(chosen) < count:  # no usable range: let the kernel pick
        sockets = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count - len(chosen))]
        try:
            for s in sockets:
                s.bind((host, 0))
            chosen += [s.getsockname()[1] for s in sockets]
        finally:
            for s in sockets:
                s.close()
    return chosen


def _port_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now, or None if it could."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def shard_lock_holder(shard_dir: Path) -> int | None:
    """The PID of the live process holding `shard_dir`'s lock (0 if it wrote none), or None.

    Probes by taking the lock and releasing it at once, without creating or truncating
    the file: the PID a live holder wrote into it must stay readable.
    """
    try:
        fd = os.open(shard_dir / SHARD_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # no shard ever ran here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


async def wait_process_exit(pid: int) -> bool:
    """Wait for process `pid` (any process, not only a child) to exit, and return True;
    False at once if there is nothing to watch (no such process, or no pidfd here)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    return True


class Supervisor:
    """Starts and supervises one local cluster. See the module docstring."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.restarts: list[RestartEvent] = []
        self.shard_addresses: dict[str, tuple[str, int]] = {}
        self.url: str = ""
        self.record = ClusterRecord(record.shard_ids(config.shards or default_shard_count()))
        self.ring = self._serving_ring()  # the newest ring children are started on
        self.secret = b""
        self.scaler = Scaler(
            self,
            stall_timeout=config.scale_stall_timeout,
            echo=self._echo_scale if config.print_scale_progress else None,
        )
        self._scale_at_start: int | None = None  # `up --shards N` on a dir of another count
        self._port = 0  # the gateways' (chosen in _build_children)
        self._secret_file = self.data_dir / SECRET_FILE_NAME
        self._children: list[_Child] = []
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._lock_file: IO[str] | None = None
        self._lifeline: tuple[int, int] | None = None  # (read end, write end)

    # ---- public helpers for tools -------------------------------------------------

    @property
    def shard_ids(self) -> list[str]:
        """The shards of the newest ring (the target ring while a scale runs)."""
        return list(self.ring.shard_ids)

    def child_pids(self) -> dict[str, int]:
        """PIDs of the children currently running, by name ("shard-0", "gateway-0", ...)."""
        return {
            c.name: c.process.pid
            for c in self._children
            if c.process is not None and c.process.returncode is None
        }

    def gateway_pids(self) -> list[int]:
        """PIDs of the gateways currently running."""
        return [pid for name, pid in self.child_pids().items() if name.startswith("gateway-")]

    # ---- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the cluster, report its URL once ready, supervise until cancelled."""
        await self._prepare()
        failure: SupervisorError | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for child in self._children:
                    nursery.start_soon(self._supervise, child)
                try:
                    await self._wait_ready()
                except SupervisorError as exc:
                    # Raised plainly below, not wrapped in the nursery's ExceptionGroup.
                    failure = exc
                    nursery.cancel_scope.cancel()
                else:
                    self.save_record(self.record)  # a new dir holds a cluster from now on
                    await nursery.start(self.scaler.run)
                    await nursery.start(control.serve, self.data_dir, self._control)
                    log.info("cluster ready at %s (%d shards)", self.url, len(self.shard_ids))
                    print(
                        f"ds-cluster ready at {self.url} (streams under {self.url}/v1/stream/)",
                        flush=True,
                    )
                    # A journaled scale is finished first, then `--shards`, if it differs.
                    journal = self.record.scale
                    wanted = self._scale_at_start or (len(journal.shards) if journal else None)
                    if wanted is not None:
                        self.scaler.request(wanted)
                    task_status.started(self.url)
        finally:
            self._stopping = True
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._stop_all()
            self._close_lifeline()  # the children are gone: nobody reads it any more
            self._release_lock()
        if failure is not None:
            raise failure

    async def _prepare(self) -> None:
        """Claim the data directory, pick addresses, build every child's command line."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._claim_data_dir()
        try:
            await self._wait_for_shard_locks()
            port = self.config.port or _free_ports(self.config.host, 1)[0]
            await self._wait_for_port(self.config.host, port)
            for sid in self.record.running_shards:
                if sid in self.record.ports:  # a recorded shard keeps its address
                    await self._wait_for_port(self.config.shard_host, self.record.ports[sid])
            self._open_lifeline()
            self._build_children(port)
        except BaseException:
            self._close_lifeline()
            self._release_lock()
            raise

    def _build_children(self, port: int) -> None:
        """Ports outside the ephemeral range; argv per child, from the record and config."""
        cfg = self.config
        self._assign_ports()
        scheme = "http" if cfg.tls_cert is None else "https"
        self.url = f"{scheme}://{_url_host(_connect_host(cfg.host))}:{port}"
        self._port = port
        secret_file = ensure_secret_file(self.data_dir / SECRET_FILE_NAME)
        try:
            self.secret = read_secret_file(secret_file)  # children would refuse it: say so here
        except SecurityError as exc:
            raise SupervisorError(str(exc)) from None
        self._secret_file = secret_file
        serving = self._serving_ring()
        target = self._target_ring()
        self.ring = target or serving
        self._children = []
        for sid in self.record.running_shards:
            ring = target if target is not None and sid in target.shard_ids else serving
            self._children.append(_Child(sid, "shard", self._shard_argv(sid, ring)))
        for g in range(cfg.gateways):
            self._children.append(_Child(f"gateway-{g}", "gateway", self._gateway_argv(self.ring)))
        if cfg.log_dir is not None:
            Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)

    def _assign_ports(self) -> None:
        """A port for every shard that has none recorded yet (they are kept across runs:
        a ring names its shards' addresses, and shards remember their ring)."""
        missing = [sid for sid in self.record.running_shards if sid not in self.record.ports]
        if missing:
            ports = dict(zip(missing, self.pick_ports(len(missing)), strict=True))
            self.record = dataclasses.replace(self.record, ports={**self.record.ports, **ports})
        self.shard_addresses = {
            sid: (self.config.shard_host, self.record.ports[sid])
            for sid in self.record.running_shards
        }

    def _endpoint(self, sid: str) -> Endpoint:
        return _connect_host(self.config.shard_host), self.record.ports[sid]

    def ring_of(self, shards: tuple[str, ...], version: int) -> Ring:
        """The ring of `shards` (each with its recorded port) at `version`."""
        return Ring(version, shards, {sid: self._endpoint(sid) for sid in shards})

    def _serving_ring(self) -> Ring:
        rec = self.record
        if all(sid in rec.ports for sid in rec.shards):
            return self.ring_of(rec.shards, rec.ring_version)
        return Ring(rec.ring_version, rec.shards)

    def _target_ring(self) -> Ring | None:
        journal = self.record.scale
        return None if journal is None else self.ring_of(journal.shards, journal.ring_version)

    def _shard_argv(self, sid: str, ring: Ring) -> list[str]:
        cfg = self.config
        host, sport = self.shard_addresses[sid]
        shard_dir = self.data_dir / sid
        shard_dir.mkdir(exist_ok=True)
        argv = [*self._launcher("shard"), "shard", "--id", sid, "--listen", f"{host}:{sport}"]
        argv += ["--data-dir", str(shard_dir), "--peers", _peers(ring)]
        argv += ["--ring-version", str(ring.version)]
        argv += ["--cluster-secret-file", str(self._secret_file)]
        if cfg.long_poll_timeout is not None:
            argv += ["--long-poll-timeout", str(cfg.long_poll_timeout)]
        if cfg.sse_max_duration is not None:
            argv += ["--sse-max-duration", str(cfg.sse_max_duration)]
        if cfg.synchronous is not None:
            argv += ["--synchronous", cfg.synchronous.upper()]
        if cfg.log_level is not None:
            argv += ["--log-level", cfg.log_level]
        if cfg.log_format is not None:
            argv += ["--log-format", cfg.log_format]
        return argv

    def _gateway_argv(self, ring: Ring) -> list[str]:
        cfg = self.config
        argv = [*self._launcher("gateway"), "gateway", "--listen", f"{cfg.host}:{self._port}"]
        argv += ["--shards", _peers(ring), "--ring-version", str(ring.version)]
        argv += ["--cluster-secret-file", str(self._secret_file)]
        if cfg.gateways > 1:
            argv.append("--reuse-port")
        if cfg.max_body_bytes is not None:
            argv += ["--max-body-bytes", str(cfg.max_body_bytes)]
        if cfg.log_level is not None:
            argv += ["--log-level", cfg.log_level]
        if cfg.log_format is not None:
            argv += ["--log-format", cfg.log_format]
        if cfg.access_log:
            argv.append("--access-log")
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            argv += ["--tls-cert", str(Path(cfg.tls_cert).resolve())]
            argv += ["--tls-key", str(Path(cfg.tls_key).resolve())]
        if cfg.auth_tokens is not None:
            argv += ["--auth-tokens", str(Path(cfg.auth_tokens).resolve())]
        if cfg.auth_jwt_key is not None:
            argv += ["--auth-jwt-key", str(Path(cfg.auth_jwt_key).resolve())]
        if cfg.auth_metrics:
            argv.append("--auth-metrics")
        if not cfg.metrics:
            argv.append("--no-metrics")
        argv += ["--public-url", cfg.public_url or self.url]
        return argv

    # ---- what a scale asks of the supervisor (scaling.ShardHost) --------------------

    def save_record(self, new: ClusterRecord) -> None:
        """Record `new` in the data dir (atomically), then hold it."""
        record.save(self.data_dir, new)
        self.record = new

    def pick_ports(self, count: int) -> list[int]:
        """`count` free shard ports, none already given to a shard of this cluster."""
        taken = set(self.record.ports.values()) | {self._port}
        ports: list[int] = []
        while len(ports) < count:
            ports += [p for p in _free_ports(self.config.shard_host, count) if p not in taken]
            taken.update(ports)
        return ports[:count]

    def shard_endpoints(self) -> dict[str, Endpoint]:
        """Where every shard this supervisor runs listens."""
        return {sid: self._endpoint(sid) for sid in self.shard_addresses}

    async def start_shards(self, ring: Ring, shards: tuple[str, ...]) -> None:
        """Start (and from now on supervise) new shard processes on `ring`."""
        assert self._nursery is not None, "the cluster is not running"
        for sid in shards:
            if any(c.name == sid and not c.retired for c in self._children):
                continue  # already running (a resumed scale)
            self.shard_addresses[sid] = (self.config.shard_host, self.record.ports[sid])
            child = _Child(sid, "shard", self._shard_argv(sid, ring))
            self._children.append(child)
            self._nursery.start_soon(self._supervise, child)
            log.info("starting %s on ring v%d", sid, ring.version)

    def use_ring(self, ring: Ring) -> None:
        """Children restarted from now on (for any reason) start on `ring`."""
        self.ring = ring
        for child in self._children:
            if child.kind == "gateway":
                child.argv = self._gateway_argv(ring)
            elif child.name in ring.shard_ids:
                child.argv = self._shard_argv(child.name, ring)

    async def retire_shards(self, shards: tuple[str, ...]) -> None:
        """Stop shards that left the ring, for good (they handed over every stream)."""
        leaving = [c for c in self._children if c.kind == "shard" and c.name in shards]
        for child in leaving:
            child.retired = True
        await _terminate(
            [c.process for c in leaving if c.process is not None and c.process.returncode is None],
            self.config.stop_grace,
        )
        self._children = [c for c in self._children if c not in leaving]
        for sid in shards:
            self.shard_addresses.pop(sid, None)

    def _echo_scale(self, text: str) -> None:
        print(f"ds-cluster scale: {text}", flush=True)

    # ---- control channel (control.py) -----------------------------------------------

    async def _control(self, request: dict[str, Any], send: control.Send) -> None:
        op = request["op"]
        if op == "scale":
            try:
                run = self.scaler.request(request.get("shards"))
            except ScaleRefused as exc:
                raise control.RequestError(str(exc)) from None
            await run.follow(send)
        elif op == "status":
            await send({"type": "result", "ok": True, "status": await self.status()})
        else:
            raise control.RequestError(f"unknown op {op!r:.40}; ops: scale, status")

    async def status(self) -> dict[str, Any]:
        """The ring, each shard's address, pid, streams and bytes, and the scale under way."""
        states = await shard_states(self.shard_endpoints(), secret=self.secret)
        pids = self.child_pids()
        shards: dict[str, Any] = {}
        for sid in sorted(self.shard_addresses, key=record.shard_order):
            state = states.get(sid)
            shards[sid] = {
                "address": format_endpoint(self._endpoint(sid)),
                "pid": pids.get(sid),
                "in_ring": sid in self.ring.shard_ids,
                **(state.to_json() if state is not None else {"error": "no answer"}),
            }
        scale = self.scaler.current
        return {
            "url": self.url,
            "data_dir": str(self.data_dir),
            "ring": self.ring.to_wire(),
            "serving_ring_version": self.record.ring_version,
            "scale": None
            if self.record.scale is None
            else {
                "shards": len(self.record.scale.shards),
                "ring_version": self.record.scale.ring_version,
                "running": scale is not None and scale.result is None,
            },
            "shards": shards,
            "gateways": {n: p for n, p in pids.items() if n.startswith("gateway-")},
        }

    def _claim_data_dir(self) -> None:
        """One supervisor per data dir; read what it holds (record.py).

        With no --shards the recorded count is used; another count starts the recorded
        cluster and then scales it once ready, so no stream is ever hidden by a ring
        that does not place it where it is.
        """
        lock = open(self.data_dir / _LOCK, "w")  # noqa: SIM115 -- held for the whole run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise SupervisorError(
                f"{self.data_dir} is in use by another ds-cluster supervisor"
            ) from None
        self._lock_file = lock
        try:
            recorded = record.load(self.data_dir)
        except RecordError as exc:
            self._release_lock()
            raise SupervisorError(str(exc)) from None
        wanted = self.config.shards
        if recorded is None:
            self.record = ClusterRecord(record.shard_ids(wanted or default_shard_count()))
        else:
            self.record = recorded
            final = recorded.scale.shards if recorded.scale else recorded.shards
            if wanted is not None and record.shard_ids(wanted) != final:
                self._scale_at_start = wanted
        self.ring = self._serving_ring()

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def _wait_for_shard_locks(self) -> None:
        """Refuse a data dir whose shards still live (under no supervisor of ours).

        The supervisor lock is free, yet a shard may still hold its directory: the orphan
        of a supervisor killed a moment ago (it exits within its lifeline grace), or a
        shard someone started by hand. Two processes on one SQLite file corrupt what both
        acknowledged, so wait a bounded time for the locks, then refuse, naming the PIDs.
        """
        deadline = trio.current_time() + self.config.owner_wait
        announced = False
        while True:
            holders = {
                sid: pid
                for sid in self.shard_ids
                if (pid := shard_lock_holder(self.data_dir / sid)) is not None
            }
            if not holders:
                return
            listed = ", ".join(
                f"{sid} (pid {pid})" if pid else f"{sid} (pid unknown)"
                for sid, pid in holders.items()
            )
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                verb = "is" if len(holders) == 1 else "are"
                raise SupervisorError(
                    f"data dir {self.data_dir} is in use: {listed} {verb} still running; "
                    "stop it first"
                )
            if not announced:
                log.info("waiting up to %.1f s for %s to exit", remaining, listed)
                announced = True
            first = next(iter(holders.values()))
            with trio.move_on_after(min(remaining, _OWNER_RECHECK)):
                # The OS drops a process's locks before its exit can be watched.
                if not (first and await wait_process_exit(first)):
                    await trio.sleep_forever()  # nothing to watch: look again shortly

    async def _wait_for_port(self, host: str, port: int) -> None:
        """The gateways' port must be free; a previous cluster's gateway may be finishing."""
        deadline = trio.current_time() + self.config.owner_wait
        announced = False
        while (problem := _port_problem(host, port)) is not None:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise SupervisorError(f"cannot listen on {host}:{port}: {problem}")
            if not announced:
                log.info("%s:%d is busy (%s); waiting up to %.1f s", host, port, problem, remaining)
                announced = True
            await trio.sleep(min(remaining, _POLL_INTERVAL))  # no event announces a freed port

    def _open_lifeline(self) -> None:
        """The pipe whose closing tells every child we are gone (see common/lifeline.py)."""
        if self._lifeline is None:
            self._lifeline = os.pipe()  # both ends close-on-exec; children get the read end

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None

    def _launcher(self, kind: str) -> list[str]:
        """`ds-cluster` with the global options every child of `kind` gets."""
        argv = list(self.config.launcher)
        if self._lifeline is not None:
            argv += ["--lifeline", str(Lifeline(self._lifeline[0], LIFELINE_GRACE[kind]))]
        return argv

    async def _wait_ready(self) -> None:
        """Poll GET /readyz on the gateway until 200: another process has no event to await.
        Over HTTPS the certificate is not verified: the probe only reads a status from our
        own child on this machine, and the certificate may name only public hosts."""
        url = f"{self.url}/readyz"
        last = "no answer yet"
        with trio.move_on_after(self.config.ready_timeout) as scope:
            async with httpx.AsyncClient(timeout=_READY_PROBE_TIMEOUT, verify=False) as client:
                while True:
                    try:
                        response = await client.get(url)
                        if response.status_code == 200:
                            return
                        last = f"status {response.status_code}"
                    except httpx.HTTPError as exc:
                        last = type(exc).__name__
                    await trio.sleep(_POLL_INTERVAL)
        if scope.cancelled_caught:
            deaths = ", ".join(f"{e.name} {e.how}" for e in self.restarts[-5:]) or "none"
            raise SupervisorError(
                f"cluster not ready after {self.config.ready_timeout:g} s "
                f"({url}: {last}; recent child deaths: {deaths})"
            )

    # ---- one child ----------------------------------------------------------------

    async def _supervise(self, child: _Child) -> None:
        """Run `child` forever: restart it whenever it dies, backing off on crash loops."""
        cfg = self.config
        delay = cfg.restart_initial_delay
        while True:
            started = trio.current_time()
            pid = 0
            returncode: int | None
            try:
                child.process = await self._spawn(child)
                pid = child.process.pid
                child.starts += 1
                if child.starts > 1:
                    log.info("%s restarted (pid %d)", child.name, pid)
                returncode = await child.process.wait()
            except OSError as exc:
                log.error("%s: cannot start %s: %s", child.name, child.argv[0], exc)
                returncode = None
            if self._stopping or child.retired:
                return
            uptime = trio.current_time() - started
            if uptime >= cfg.restart_reset_after:
                delay = cfg.restart_initial_delay
            event = RestartEvent(child.name, pid, returncode, uptime, delay, trio.current_time())
            self.restarts.append(event)
            log.warning(
                "%s (pid %d) %s after %.1f s; restarting in %.1f s",
                child.name,
                pid,
                event.how,
                uptime,
                delay,
            )
            await trio.sleep(delay)
            if child.retired:
                return
            delay = min(delay * 2, cfg.restart_max_delay)

    async def _spawn(self, child: _Child) -> trio.Process:
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which then
        # stops the children in order instead of racing them.
        pass_fds = (self._lifeline[0],) if self._lifeline is not None else ()
        if self.config.log_dir is None:
            return await trio.lowlevel.open_process(
                child.argv, stdin=subprocess.DEVNULL, process_group=0, pass_fds=pass_fds
            )
        with open(Path(self.config.log_dir) / f"{child.name}.log", "ab") as logfile:
            logfile.write(f"--- {' '.join(child.argv)}\n".encode())
            logfile.flush()
            return await trio.lowlevel.open_process(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                process_group=0,
                pass_fds=pass_fds,
            )

    # ---- shutdown -----------------------------------------------------------------

    async def _stop_all(self) -> None:
        """Gateways first (no new requests), then shards; each SIGTERM, then SIGKILL."""
        for kind in ("gateway", "shard"):
            running = [
                c.process
                for c in self._children
                if c.kind == kind and c.process is not None and c.process.returncode is None
            ]
            await _terminate(running, self.config.stop_grace)
        log.info("all children stopped")


async def _terminate(processes: list[trio.Process], grace: float) -> None:
    """SIGTERM each process, wait up to `grace` seconds, SIGKILL what is left, reap all."""
    for proc in processes:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    with trio.move_on_after(grace):
        for proc in processes:
            await proc.wait()
    for proc in processes:
        if proc.returncode is None:
            log.warning("pid %d ignored SIGTERM for %.1f s; killing it", proc.pid, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# ---- CLI --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="number of shard processes (default: the count the data dir records; for a new "
        f"one {default_shard_count()}, from the CPU count); another count than the recorded "
        "one starts the cluster, then moves it to that many shards, as `ds-cluster scale`",
    )
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes (default: 1)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="gateways' bind address (default: %(default)s)"
    )
    parser.add_argument(
        "--shard-host",
        default="127.0.0.1",
        help="shards' RPC bind address, apart from --host so that exposing the gateways "
        "does not expose the shards (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="gateway port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("./data"), help="data root (default: ./data)"
    )
    parser.add_argument(
        "--long-poll-timeout", type=float, default=None, help="seconds (passed to shards)"
    )
    parser.add_argument(
        "--sse-max-duration", type=float, default=None, help="seconds (passed to shards)"
    )
    parser.add_argument(
        "--synchronous",
        type=str.upper,
        choices=["FULL", "NORMAL"],
        default=None,
        help="SQLite synchronous mode for shards (default: the shard's, FULL)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=None, help="largest request body (gateways)"
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=None,
        help="log level of the supervisor, gateways and shards (default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text or json lines, for the supervisor, gateways and shards (default: text)",
    )
    parser.add_argument("--access-log", action="store_true", help="gateways log every request")
    parser.add_argument(
        "--tls-cert", type=Path, default=None, metavar="PEM", help="gateways serve HTTPS"
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's key"
    )
    parser.add_argument(
        "--public-url",
        default=None,
        metavar="URL",
        help="scheme://host[:port] clients reach the gateways at, for Location headers "
        "(default: the URL printed when ready)",
    )
    parser.add_argument(
        "--auth-tokens",
        type=Path,
        default=None,
        metavar="FILE",
        help="gateways require bearer tokens from this JSON file (docs/auth.md)",
    )
    parser.add_argument(
        "--auth-jwt-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="gateways also accept JWTs signed with this key (HS256 secret, PEM, JWKS)",
    )
    parser.add_argument(
        "--auth-metrics", action="store_true", help="gateways' /metrics needs a token too"
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="gateways record no metrics and serve no /metrics (to measure what they cost)",
    )
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="write each child's log to DIR/NAME.log"
    )


def run(args: argparse.Namespace) -> int:
    log_format = args.log_format or "text"
    logs.setup("supervisor", "supervisor", level=args.log_level, log_format=log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness probe's requests
    try:
        config = ClusterConfig(
            shards=args.shards,
            gateways=args.gateways,
            host=args.host,
            port=args.port,
            shard_host=args.shard_host,
            data_dir=args.data_dir,
            long_poll_timeout=args.long_poll_timeout,
            sse_max_duration=args.sse_max_duration,
            synchronous=args.synchronous,
            max_body_bytes=args.max_body_bytes,
            log_level=args.log_level,
            log_format=args.log_format,
            access_log=args.access_log,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            print_scale_progress=True,
            public_url=args.public_url,
            auth_tokens=args.auth_tokens,
            auth_jwt_key=args.auth_jwt_key,
            auth_metrics=args.auth_metrics,
            metrics=not args.no_metrics,
            log_dir=args.log_dir,
        )
    except ValueError as exc:
        print(f"ds-cluster up: {exc}", file=sys.stderr)
        return 2
    failed = False
    try:
        trio.run(_main, config)
    except* SupervisorError as group:  # also catches a bare one
        for error in group.exceptions:
            log.error("%s", error)
        failed = True
    return 1 if failed else 0


async def _main(config: ClusterConfig) -> None:
    supervisor = Supervisor(config)
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        trio.open_signal_receiver(signal.SIGHUP) as hangups,
    ):
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s: stopping the cluster", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            async def pass_on_hangups() -> None:
                """SIGHUP reloads the gateways' certificates (and what else they reload)."""
                async for _ in hangups:
                    gateways = supervisor.gateway_pids()
                    log.info("SIGHUP: passed on to %d gateway(s)", len(gateways))
                    for pid in gateways:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGHUP)

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(pass_on_hangups)
            await nursery.start(supervisor.run)
