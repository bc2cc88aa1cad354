"""Orchestration of one chaos run: launch, plan, write/read under faults, drain, verify.

Phases: the cluster comes up (in-process `Supervisor`; `ds-cluster up` as a child
process when the supervisor itself is to be killed; or an external `--url` without
faults); streams are planned so every shard owns some, JSON and binary alike; writers
and readers start; forks of streams on one shard are created on another mid-run; faults
are injected until the duration is up; then writers finish their in-flight batch, every
shard must accept a probe write, a final catch-up read takes each stream's content,
readers get time to catch up to it, and the verifier judges.
"""

from __future__ import annotations

import dataclasses
import os
import random
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import trio

from ds_cluster.common.ring import Ring

from .faults import FaultInjector, KillableSupervisor, is_own_child
from .model import StreamPlan
from .payload import BINARY, JSON, Decoder, PayloadError
from .process_cluster import ProcessCluster
from .report import ChaosResult, progress_line, summary
from .scaling import ScaleDriver, parse_counts, parse_range
from .verify import verify
from .workload import Reader, Run, Writer, create_stream


@dataclass
class ChaosOptions:
    duration: float = 60.0
    shards: int = 4
    kill_interval: float = 5.0
    kill_supervisor_interval: float = 0.0  # > 0: run `up` as a process and SIGKILL it
    scale_interval: float = 0.0  # > 0: change the shard count about this often
    scale_range: str | None = None  # "LO:HI" shard counts; default: shards:shards+1
    scale_to: str | None = None  # "N,M,...": these counts in turn instead, then no more
    seed: int | None = None
    stop_probability: float = 0.2  # share of faults that are a SIGSTOP of a few seconds
    streams_per_shard: int = 3
    forks: int | None = None  # default: one per shard
    write_pause: float = 0.02
    long_poll_timeout: float = 5.0
    sse_max_duration: float = 15.0
    request_timeout: float = 15.0
    reader_idle: float = 20.0
    drain_timeout: float = 30.0
    progress_interval: float = 3.0
    url: str | None = None
    data_dir: str | None = None
    keep_data: bool = False
    report_json: str | None = None


class Cluster(Protocol):
    url: str

    async def run(self, *, task_status: Any = ...) -> None: ...

    def child_pids(self) -> dict[str, int]: ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def supervised_cluster(options: ChaosOptions, data_dir: str) -> Cluster:
    """The real thing: `ds_cluster.supervisor.cluster.Supervisor` launching shards and a gateway."""
    from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor

    wanted: dict[str, Any] = {
        "shards": options.shards,
        "gateways": 1,
        "host": "127.0.0.1",
        "port": free_port(),
        "data_dir": data_dir,
        "long_poll_timeout": options.long_poll_timeout,
        "sse_max_duration": options.sse_max_duration,
        "log_dir": os.path.join(data_dir, "logs"),  # children's logs, kept on failure
        "ready_timeout": 60.0,
    }
    known = {f.name for f in dataclasses.fields(ClusterConfig)}
    return Supervisor(ClusterConfig(**{k: v for k, v in wanted.items() if k in known}))


def process_cluster(options: ChaosOptions, data_dir: str) -> Cluster:
    """`ds-cluster up` as a child process, so that the supervisor itself can be killed."""
    return ProcessCluster(options, data_dir)


class ExternalCluster:
    """A server someone else runs: no children, so no faults."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def child_pids(self) -> dict[str, int]:
        return {}


def plan_streams(shards: list[str], per_shard: int, token: str) -> list[StreamPlan]:
    """`per_shard` streams on every shard, alternating JSON and binary."""
    ring = Ring(1, tuple(shards))
    plans: dict[str, list[StreamPlan]] = {s: [] for s in shards}
    n = 0
    while any(len(p) < per_shard for p in plans.values()):
        path = f"chaos-{token}/s{n}"
        n += 1
        owner = ring.owner(path)
        bucket = plans[owner]
        if len(bucket) < per_shard:
            content_type = JSON if len(bucket) % 2 == 0 else BINARY
            bucket.append(StreamPlan(path=path, content_type=content_type, shard=owner))
    return [p for s in shards for p in plans[s]]


def path_on(shards: list[str], shard: str, stem: str) -> str:
    """A path under `stem` that the ring places on `shard`."""
    ring = Ring(1, tuple(shards))
    return next(f"{stem}{n}" for n in range(1_000_000) if ring.owner(f"{stem}{n}") == shard)


def plan_forks(
    shards: list[str], sources: list[StreamPlan], count: int, token: str
) -> list[StreamPlan]:
    """Forks of single-writer streams, each placed on a different shard than its source."""
    ring = Ring(1, tuple(shards))
    forks = []
    n = 0
    for i in range(count):
        if not sources:
            break
        source = sources[i % len(sources)]
        while True:
            path = f"chaos-{token}/f{n}"
            n += 1
            owner = ring.owner(path)
            if owner != source.shard or len(shards) == 1:
                break
        forks.append(
            StreamPlan(
                path=path, content_type=source.content_type, shard=owner, fork_of=source.path
            )
        )
    return forks


async def final_read(run: Run, plan: StreamPlan, deadline: float) -> list[str] | None:
    """Catch-up read of the whole stream from -1 (retrying), as message ids."""
    decoder = Decoder(plan.content_type)
    ids: list[str] = []
    offset = "-1"
    with trio.move_on_after(deadline):
        while True:
            response = await run.ensure("GET", plan.path, (200,), params={"offset": offset})
            if response.status_code != 200:
                run.violation(
                    "unreadable", plan.path, f"final read answered {response.status_code}"
                )
                return None
            try:
                ids.extend(decoder.feed(response.content))
            except PayloadError as exc:
                run.violation("corrupt", plan.path, f"at offset {offset}: {exc}")
                return None
            next_offset = response.headers.get("stream-next-offset", offset)
            up_to_date = response.headers.get("stream-up-to-date", "").lower() == "true"
            if up_to_date:
                if decoder.leftover:
                    run.violation("corrupt", plan.path, f"{decoder.leftover} bytes of a torn frame")
                return ids
            offset = next_offset
    return None


async def probe_shard(run: Run, shard: str, path: str) -> str | None:
    """Create a stream on `shard` and append to it; None if fine, else what went wrong."""
    response = await run.ensure("PUT", path, (200, 201), headers={"content-type": JSON})
    if response.status_code not in (200, 201):
        return f"{shard}: probe PUT answered {response.status_code}"
    started = trio.current_time()
    response = await run.ensure(
        "POST", path, (200, 204), headers={"content-type": JSON}, content=b'{"probe":1}'
    )
    if response.status_code not in (200, 204):
        return f"{shard}: probe POST answered {response.status_code}"
    run.on_write_ok(shard, started)
    return None


async def run_chaos(
    options: ChaosOptions,
    *,
    cluster_factory: Callable[[ChaosOptions, str], Cluster] | None = None,
    out: Callable[[str], None] = lambda line: print(line, flush=True),
) -> ChaosResult:
    seed = options.seed if options.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    own_dir = options.data_dir is None
    data_dir = options.data_dir or tempfile.mkdtemp(prefix="ds-chaos-")
    if options.url:
        cluster: Cluster = ExternalCluster(options.url)
    else:
        default = process_cluster if options.kill_supervisor_interval > 0 else supervised_cluster
        cluster = (cluster_factory or default)(options, data_dir)
    out(f"[chaos] seed {seed}; data in {data_dir}")
    result: ChaosResult | None = None
    try:
        async with trio.open_nursery() as cluster_nursery:
            await cluster_nursery.start(cluster.run)
            try:
                result = await _exercise(options, cluster, seed, rng, out, Path(data_dir))
            finally:
                cluster_nursery.cancel_scope.cancel()
        # Checked once the cluster is stopped: children outliving a supervisor.
        for orphan in getattr(cluster, "orphans", []):
            result.health_detail.append(f"orphan: {orphan}")
            result.healthy = False
    finally:
        if result is not None:
            if own_dir and result.passed and not options.keep_data:
                shutil.rmtree(data_dir, ignore_errors=True)
            else:
                result.data_dir = data_dir
    out(summary(result))
    if options.report_json:
        result.dump(options.report_json)
    return result


async def _exercise(
    options: ChaosOptions,
    cluster: Cluster,
    seed: int,
    rng: random.Random,
    out: Callable,
    data_dir: Path,
) -> ChaosResult:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    timeout = httpx.Timeout(options.request_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        exercise = Exercise(options, cluster, seed, rng, client, out, data_dir)
        await exercise.run()
        return await exercise.result()


class Exercise:
    """The state of one run between launch and verdict; one method per phase."""

    def __init__(
        self,
        options: ChaosOptions,
        cluster: Cluster,
        seed: int,
        rng: random.Random,
        client: httpx.AsyncClient,
        out: Callable[[str], None],
        data_dir: Path | None = None,
    ) -> None:
        self.options = options
        self.cluster = cluster
        self.seed = seed
        self.out = out
        self.client = client
        self.shards = sorted(k for k in cluster.child_pids() if k.startswith("shard-")) or [
            "external"
        ]
        self.token = f"{seed}-{secrets.token_hex(3)}"
        self.plans = plan_streams(self.shards, options.streams_per_shard, self.token)
        start = trio.current_time()
        self.injector: FaultInjector | None = None
        self.owns: Callable[[int], bool] = getattr(cluster, "owns", is_own_child)
        killable = cluster if isinstance(cluster, KillableSupervisor) else None
        if not options.url and (
            options.kill_interval > 0 or (killable and options.kill_supervisor_interval > 0)
        ):
            self.injector = FaultInjector(
                cluster.child_pids,
                self.shards,
                rng,
                start=start,
                kill_interval=options.kill_interval,
                stop_probability=options.stop_probability,
                log=out,
                owns=self.owns,
                supervisor=killable,
                supervisor_kill_interval=options.kill_supervisor_interval,
            )
        self.run_ = Run(
            cluster.url,
            client,
            rng,
            request_timeout=options.request_timeout,
            on_write_ok=self.injector.note_write_ok if self.injector else lambda s, t: None,
        )
        self.run_.start = start
        self.scaler: ScaleDriver | None = None
        if options.scale_interval > 0 and not options.url and data_dir is not None:
            shard_range = parse_range(
                options.scale_range or f"{len(self.shards)}:{len(self.shards) + 1}"
            )
            self.scaler = ScaleDriver(
                data_dir,
                shard_range,
                options.scale_interval,
                rng,
                start=start,
                shards=len(self.shards),
                log=out,
                on_begin=self._scale_begins,
                on_done=self._scale_done,
                sequence=parse_counts(options.scale_to) if options.scale_to else None,
            )
        self.writers: list[Writer] = []
        for i, plan in enumerate(self.plans):
            # The first stream of every shard is shared by two producers.
            for j in range(2 if i % options.streams_per_shard == 0 else 1):
                self._add_writer(plan, f"w{i}.{j}")
        singles = [w for w in self.writers if len(w.plan.writers) == 1]
        self.fork_sources = {w.plan.path: w for w in singles}
        n_forks = options.forks if options.forks is not None else len(self.shards)
        self.forks = plan_forks(self.shards, [w.plan for w in singles], n_forks, self.token)
        self.readers: list[Reader] = []
        self.stop_writers = trio.Event()
        self.finals: dict[str, list[str]] = {}
        self.health: list[str] = []

    def _scale_begins(self, target: int) -> None:
        """Faults may hit the shards of both rings while streams move between them."""
        ids = set(self.shards) | {f"shard-{k}" for k in range(target)}
        self.shards[:] = sorted(ids, key=lambda sid: int(sid.rsplit("-", 1)[1]))

    def _scale_done(self, count: int) -> None:
        """The cluster serves on `count` shards: faults pick among them, and each stream
        counts as its new owner's (for the time a fault's shard takes to write again)."""
        ids = [f"shard-{k}" for k in range(count)]
        left = set(self.shards) - set(ids)
        self.shards[:] = ids
        ring = Ring(1, tuple(ids))
        for plan in self.plans + self.forks:
            owner = ring.owner(plan.path)
            plan.moves += owner != plan.shard
            plan.shard = owner
        if self.injector:
            self.injector.left_ring(left)

    def _add_writer(self, plan: StreamPlan, name: str) -> Writer:
        writer = Writer(self.run_, plan, name, self.options.write_pause)
        plan.writers.append(name)
        self.writers.append(writer)
        return writer

    def _add_readers(self, plan: StreamPlan) -> list[Reader]:
        stem = plan.path.rsplit("/", 1)[1]
        made = [
            Reader(self.run_, plan, f"r-{stem}-{mode}", mode, self.options.reader_idle)
            for mode in ("long-poll", "sse")
        ]
        self.readers.extend(made)
        return made

    async def run(self) -> None:
        options = self.options
        async with trio.open_nursery() as setup:
            for plan in self.plans:
                setup.start_soon(create_stream, self.run_, plan)
        for plan in self.plans:
            if plan.created:
                self._add_readers(plan)
        async with trio.open_nursery() as side:
            side.start_soon(self._progress)
            async with trio.open_nursery() as readers:
                for reader in self.readers:
                    readers.start_soon(reader.tail)
                with trio.move_on_after(options.duration + options.drain_timeout):
                    await self._load(readers)
                if self.injector:
                    self.injector.resume_all()
                pending = [w.name for w in self.writers if w.ledger.pending]
                if pending:
                    self.out(
                        f"[chaos] {len(pending)} writers left a batch in flight: {pending[:8]}"
                    )
                await self._probe_shards()
                await self._final_reads()
                self.out(f"[chaos {self.run_.now():7.1f}s] final read done; readers catching up")
                with trio.move_on_after(options.drain_timeout):
                    async with trio.open_nursery() as waits:
                        for reader in self.readers:
                            final = self.finals.get(reader.plan.path)
                            if final is not None:
                                waits.start_soon(reader.wait_for, len(final))
                readers.cancel_scope.cancel()
            side.cancel_scope.cancel()

    async def _load(self, readers: trio.Nursery) -> None:
        """Writers, forks and faults for `duration`; then writers finish their batch."""
        options = self.options
        fault_scope = trio.CancelScope()
        async with trio.open_nursery() as writers:
            for writer in self.writers:
                writers.start_soon(writer.write_until, self.stop_writers)
            for k, fork in enumerate(self.forks):
                at = options.duration * (0.15 + 0.35 * k / max(1, len(self.forks)))
                writers.start_soon(self._fork_later, fork, at, writers, readers)
            injector, scaler = self.injector, self.scaler

            async def faults() -> None:
                with fault_scope:
                    async with trio.open_nursery() as both:
                        if injector:
                            both.start_soon(injector.run)
                        if scaler:
                            both.start_soon(scaler.run)

            writers.start_soon(faults)
            await trio.sleep(options.duration)
            fault_scope.cancel()
            self.stop_writers.set()
            self.out(f"[chaos {self.run_.now():7.1f}s] faults stopped; writers finishing")

    async def _fork_later(
        self, fork: StreamPlan, at: float, writers: trio.Nursery, readers: trio.Nursery
    ) -> None:
        """Fork a single-writer stream at an offset its writer was acknowledged at."""
        assert fork.fork_of is not None  # a fork's plan names its source
        source = self.fork_sources[fork.fork_of]
        await trio.sleep_until(self.run_.start + at)
        while not source.ledger.fork_points and not self.stop_writers.is_set():
            await source.progress.wait()
        if self.stop_writers.is_set() or not source.ledger.fork_points:
            return
        offset, batch = source.ledger.fork_points[-1]
        fork.fork_offset = offset
        fork.prefix = source.ledger.acked_ids(batch)
        await create_stream(self.run_, fork)
        if not fork.created:
            return
        self.run_.stats.forks_created += 1
        self.out(
            f"[chaos {self.run_.now():7.1f}s] forked {source.plan.path} ({source.plan.shard}) "
            f"at {offset} -> {fork.path} ({fork.shard})"
        )
        writer = self._add_writer(fork, "w" + fork.path.rsplit("/", 1)[1])
        writers.start_soon(writer.write_until, self.stop_writers)
        for reader in self._add_readers(fork):
            readers.start_soon(reader.tail)

    async def _progress(self) -> None:
        run, last, last_t = self.run_, 0, 0.0
        while True:
            await trio.sleep(self.options.progress_interval)
            t = run.now()
            rate = (run.stats.acked_batches - last) / max(t - last_t, 1e-6)
            last, last_t = run.stats.acked_batches, t
            injector = self.injector
            line = progress_line(
                t,
                run.stats,
                rate,
                injector.events if injector else [],
                injector.down() if injector else [],
                sum(len(r.log.received) for r in self.readers),
                len(run.violations),
            )
            self.out(line)

    async def _probe_shards(self) -> None:
        """Every shard must accept a write again (this also closes open fault records)."""
        deadline = self.options.drain_timeout
        with trio.move_on_after(deadline) as scope:
            async with trio.open_nursery() as probes:
                for shard in self.shards:
                    path = (
                        f"chaos-{self.token}/probe"
                        if shard == "external"
                        else path_on(self.shards, shard, f"chaos-{self.token}/probe")
                    )
                    probes.start_soon(self._probe, shard, path)
        if scope.cancelled_caught:
            self.health.append(f"some shard did not accept a write within {deadline}s")

    async def _probe(self, shard: str, path: str) -> None:
        problem = await probe_shard(self.run_, shard, path)
        if problem:
            self.health.append(problem)

    async def _final_reads(self) -> None:
        async with trio.open_nursery() as reads:
            for plan in self.plans + self.forks:
                if plan.created:
                    reads.start_soon(self._final_read, plan)

    async def _final_read(self, plan: StreamPlan) -> None:
        final = await final_read(self.run_, plan, self.options.drain_timeout)
        if final is not None:
            self.finals[plan.path] = final

    async def _check_health(self) -> None:
        if self.injector:
            for event in self.injector.events:
                if event.recovered_after is None and not event.left_ring:
                    self.health.append(
                        f"{event.shard} served no write after the {event.kind} at {event.at:.1f}s"
                    )
            self.health.extend(self.injector.problems)
        if self.scaler:
            self.health.extend(self.scaler.problems)
            pids = self.cluster.child_pids()
            for name, pid in pids.items():
                if not self.owns(pid):
                    self.health.append(f"{name} (pid {pid}) is not running at the end")
            for name in sorted(set(self.shards) - set(pids)):
                self.health.append(f"{name} is not running at the end")
        if not self.options.url:
            try:
                response = await self.client.get(
                    self.cluster.url.rstrip("/") + "/readyz", timeout=5
                )
                if response.status_code != 200:
                    self.health.append(f"gateway /readyz answered {response.status_code}")
            except httpx.HTTPError as exc:
                self.health.append(f"gateway /readyz failed: {exc!r}")

    def _note_respawns(self) -> None:
        """Split each kill's unavailability: the supervisor's part (until it spawned the
        successor: its restart delay) and the rest (shard start-up, gateway reconnect)."""
        restarts = getattr(self.cluster, "restarts", None) or []
        for event in self.injector.events if self.injector else []:
            if event.kind != "kill":
                continue
            for restart in restarts:
                if restart.name == event.shard and restart.pid == event.pid:
                    spawned = restart.at + restart.delay - self.run_.start
                    event.respawned_after = max(0.0, spawned - event.at)
                    break

    async def result(self) -> ChaosResult:
        await self._check_health()
        self._note_respawns()
        verdict = verify(
            self.plans + self.forks,
            self.finals,
            [w.ledger for w in self.writers],
            [r.log for r in self.readers],
        )
        verdict.violations[:0] = self.run_.violations  # what writers/readers saw as it ran
        return ChaosResult(
            seed=self.seed,
            shards=len(self.shards),
            duration=self.options.duration,
            kill_interval=self.options.kill_interval,
            kill_supervisor_interval=self.options.kill_supervisor_interval,
            stats=self.run_.stats,
            faults=self.injector.events if self.injector else [],
            verdict=verdict,
            readers=[r.log for r in self.readers],
            streams=len(self.plans),
            healthy=not self.health,
            health_detail=self.health,
            scales=self.scaler.events if self.scaler else [],
            moved_paths=[p.path for p in self.plans + self.forks if p.moves],
            scale_interval=self.options.scale_interval,
        )


def exit_code(result: ChaosResult) -> int:
    return 0 if result.passed else 1
