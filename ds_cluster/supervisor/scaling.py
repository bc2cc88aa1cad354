"""A live change of a local cluster's shard count, journaled so that it always finishes.

One scale, driven by the supervisor (`ds-cluster scale`, or `ds-cluster up --shards N`
on a dir that records another count):

1. journal the target ring (ids `shard-0` .. `shard-{N-1}`, version + 1) in the data
   dir's record (record.py), with a port for every new shard;
2. start the new shards, on the target ring; from now on a child restarted for any
   reason (gateways included) starts on the target ring;
3. run the rebalance driver (rebalance.py): every shard gets the target ring and moves
   what it no longer owns; progress lines go to whoever asked;
4. once every shard reports done, stop the shards that left the ring (they are empty);
5. record the target ring as the one served, and drop the journal.

A supervisor that dies anywhere in between finds the journal at its next start: it
starts the shards of both rings and resumes at step 2 (every step is idempotent). A
failure (no progress for a long time) leaves the journal and every shard running, so
the cluster keeps serving, and is reported; running the same scale again resumes it.

The scale belongs to the supervisor, not to the client that asked: a client that goes
away (Ctrl-C on `ds-cluster scale`) leaves it running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

from ds_cluster.common.ring import Endpoint, Ring
from ds_cluster.supervisor.rebalance import Progress, RebalanceError, rebalance, shard_states
from ds_cluster.supervisor.record import MAX_SHARDS, ClusterRecord, shard_ids

log = logging.getLogger("ds_cluster.supervisor")

HEARTBEAT = 10.0  # seconds between progress lines while nothing changes


class ScaleRefused(Exception):
    """A scale request that cannot be taken now (bad count, another scale running)."""


class ShardHost(Protocol):
    """What a scale needs from the supervisor."""

    record: ClusterRecord
    secret: bytes

    def save_record(self, record: ClusterRecord) -> None: ...

    def pick_ports(self, count: int) -> list[int]: ...

    def ring_of(self, shards: tuple[str, ...], version: int) -> Ring: ...

    def shard_endpoints(self) -> dict[str, Endpoint]: ...

    async def start_shards(self, ring: Ring, shards: tuple[str, ...]) -> None: ...

    def use_ring(self, ring: Ring) -> None: ...

    async def retire_shards(self, shards: tuple[str, ...]) -> None: ...


class ScaleRun:
    """One scale's progress, as answer lines for any number of watchers."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.lines: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self._changed = trio.Event()

    def say(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def finish(self, ok: bool, message: str) -> None:
        self.result = {"type": "result", "ok": ok, "message": message}
        self.say(self.result)

    async def follow(self, send: Callable[[dict[str, Any]], Any]) -> None:
        """Send every line so far and each new one, until (and including) the result."""
        sent = 0
        while True:
            while sent < len(self.lines):
                await send(self.lines[sent])
                sent += 1
            if self.result is not None:
                return
            await self._changed.wait()


class Scaler:
    """Runs the host's scales, one at a time, each in the supervisor's own nursery."""

    def __init__(
        self,
        host: ShardHost,
        *,
        stall_timeout: float,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.stall_timeout = stall_timeout
        self.echo = echo  # also print progress here (`up` prints to its stdout)
        self.current: ScaleRun | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery scales run in, until cancelled (with the supervisor)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def request(self, shards: object) -> ScaleRun:
        """Start a scale to `shards` shards (or join the one under way to the same count)."""
        if type(shards) is not int or not 1 <= shards <= MAX_SHARDS:
            raise ScaleRefused(f"shards must be a count of 1 to {MAX_SHARDS}")
        current = self.current
        if current is not None and current.result is None:
            if current.shards == shards:
                return current
            raise ScaleRefused(f"a scale to {current.shards} shards is under way; wait for it")
        assert self._nursery is not None
        run = ScaleRun(shards)
        self.current = run
        self._nursery.start_soon(self._drive, run)
        return run

    async def _drive(self, run: ScaleRun) -> None:
        try:
            message = await self.scale(run)
        except (RebalanceError, OSError) as exc:
            log.error("scale to %d shards failed: %s", run.shards, exc)
            run.finish(
                False,
                f"{exc}; the cluster keeps serving, and running the same scale again resumes it",
            )
        except Exception as exc:
            log.exception("scale to %d shards failed", run.shards)
            run.finish(False, f"internal error: {exc!r}")
            raise
        else:
            run.finish(True, message)

    async def scale(self, run: ScaleRun) -> str:
        """Steps 1-5 of the module docstring; first the journaled scale, if one is left."""
        host = self.host
        if host.record.scale is not None:
            pending = host.record.scale
            if tuple(pending.shards) != shard_ids(run.shards):
                self._say(
                    run, f"finishing the interrupted scale to {len(pending.shards)} shards first"
                )
            await self._move(run)
        target = shard_ids(run.shards)
        if host.record.shards == target:
            return f"the cluster serves on {run.shards} shards (ring v{host.record.ring_version})"
        new = [sid for sid in target if sid not in host.record.shards]
        ports = dict(zip(new, host.pick_ports(len(new)), strict=True))
        host.save_record(host.record.begin_scale(target, ports))
        await self._move(run)
        record = host.record
        return f"the cluster serves on {len(record.shards)} shards (ring v{record.ring_version})"

    async def _move(self, run: ScaleRun) -> None:
        """Steps 2-5 for the journaled scale."""
        host = self.host
        journal = host.record.scale
        assert journal is not None
        ring = host.ring_of(journal.shards, journal.ring_version)
        before = host.record.shards
        leaving = tuple(sid for sid in before if sid not in ring.shard_ids)
        self._say(
            run,
            f"ring v{ring.version}: {len(before)} -> {len(ring.shard_ids)} shards"
            + (f"; leaving: {', '.join(leaving)}" if leaving else ""),
        )
        # Before a new shard starts: it brings its ring to its peers, and moves begin.
        baseline = await shard_states(host.shard_endpoints(), secret=host.secret)
        await host.start_shards(ring, tuple(s for s in ring.shard_ids if s not in before))
        host.use_ring(ring)

        said: dict[str, object] = {}  # the figures last said
        said_at = 0.0

        def report(progress: Progress) -> None:
            nonlocal said, said_at
            figures = progress.to_json()
            key = {k: v for k, v in figures.items() if k != "elapsed"}
            now = trio.current_time()
            # A line when something moved, not every poll; and one now and then while
            # nothing does, so whoever follows knows the supervisor is still at it.
            if key != said or now - said_at >= HEARTBEAT:
                said, said_at = key, now
                self._say(run, progress.line(), progress=figures)

        final = await rebalance(
            host.shard_endpoints(),
            ring,
            report,
            secret=host.secret,
            stall_timeout=self.stall_timeout,
            before=baseline,
        )
        if leaving:
            await host.retire_shards(leaving)
            self._say(run, f"stopped {', '.join(leaving)} (empty)")
        host.save_record(host.record.finish_scale())
        self._say(
            run,
            f"ring v{ring.version} serving: moved {final.moved_streams} streams "
            f"in {final.elapsed:.1f} s",
            progress=final.to_json(),
        )

    def _say(self, run: ScaleRun, text: str, **extra: Any) -> None:
        log.info("scale: %s", text)
        if self.echo is not None:
            self.echo(text)
        run.say({"type": "progress", "text": text, **extra})
