"""Fault injection for chaos runs: SIGKILL or SIGSTOP a random shard at intervals, and
(when the supervisor runs as its own process) SIGKILL the supervisor itself.

Only processes the run itself launched are touched (their PIDs come from the
supervisor). Each fault is recorded with the time the shard took to serve a write again:
the first acknowledged write to one of its streams whose request *started* after the
fault (a reply already on its way when the signal landed proves nothing). A supervisor
kill takes every shard down, so it counts as recovered once every shard has served such
a write.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import trio

from .model import FaultEvent


def is_own_child(pid: int) -> bool:
    """True if `pid` is a live child of this process (the supervisor runs in-process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[1]) == os.getpid()


@runtime_checkable
class KillableSupervisor(Protocol):
    """A supervisor running as its own process (see process_cluster.py)."""

    def kill_supervisor(self) -> int: ...

    def restart_supervisor(self) -> Awaitable[None]: ...


SUPERVISOR = "supervisor"  # the `shard` of a supervisor kill: it takes every shard down


class FaultInjector:
    def __init__(
        self,
        child_pids: Callable[[], dict[str, int]],
        shards: list[str],
        rng: random.Random,
        *,
        start: float,
        kill_interval: float,
        stop_probability: float,
        stop_seconds: tuple[float, float] = (1.0, 4.0),
        log: Callable[[str], None] = print,
        owns: Callable[[int], bool] = is_own_child,
        supervisor: KillableSupervisor | None = None,
        supervisor_kill_interval: float = 0.0,
    ) -> None:
        self.child_pids = child_pids
        self.owns = owns
        self.supervisor = supervisor
        self.supervisor_kill_interval = supervisor_kill_interval
        self.problems: list[str] = []  # a supervisor that would not come back, ...
        self.shards = shards
        self.rng = rng
        self.start = start
        self.kill_interval = kill_interval
        self.stop_probability = stop_probability
        self.stop_seconds = stop_seconds
        self.log = log
        self.events: list[FaultEvent] = []
        self._open: dict[str, list[FaultEvent]] = {}  # shard -> faults not yet recovered from
        self._stopped: dict[int, str] = {}  # pid -> shard, while SIGSTOPped
        # Held while a shard is SIGSTOPped and while the supervisor is killed and
        # restarted: a stopped shard cannot act on its lifeline, so it would keep its lock
        # and the new supervisor would (rightly) refuse the data dir.
        self._signalling = trio.Lock()

    def now(self) -> float:
        return trio.current_time() - self.start

    def down(self) -> list[str]:
        return sorted(shard for shard, events in self._open.items() if events)

    def note_write_ok(self, shard: str, started: float) -> None:
        """A write to `shard` started at `started` (trio clock) was acknowledged."""
        events = self._open.get(shard)
        if not events:
            return
        started_rel = started - self.start
        now = self.now()
        still_open = []
        for event in events:
            if started_rel < event.at:
                still_open.append(event)
        self._open[shard] = still_open
        for event in events:
            if started_rel >= event.at and not self._is_open(event):
                event.recovered_after = now - event.at

    def left_ring(self, shards: set[str]) -> None:
        """`shards` left the ring (a scale down): their open faults have nothing left to
        recover (no stream is theirs any more), so they are closed as such."""
        for shard in shards:
            for event in self._open.pop(shard, []):
                if event.kind != "supervisor-kill":
                    event.left_ring = True
            # a supervisor kill waits for the shards that remain, not for this one

    def _is_open(self, event: FaultEvent) -> bool:
        return any(e is event for events in self._open.values() for e in events)

    async def run(self) -> None:
        """Inject faults until cancelled; a stopped shard is always continued on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                if self.kill_interval > 0:
                    nursery.start_soon(self._shard_faults)
                if self.supervisor is not None and self.supervisor_kill_interval > 0:
                    nursery.start_soon(self._supervisor_kills, self.supervisor)
        finally:
            self.resume_all()

    async def _shard_faults(self) -> None:
        while True:
            await trio.sleep(self.kill_interval * (0.75 + 0.5 * self.rng.random()))
            candidates = [s for s in self.shards if not self._open.get(s)]
            if not candidates:
                continue  # everyone is still recovering; skip this tick
            shard = self.rng.choice(candidates)
            async with self._signalling:
                pid = self.child_pids().get(shard)
                if pid is None or not self.owns(pid):
                    continue  # between incarnations, or not ours to signal
                if self.rng.random() < self.stop_probability:
                    await self._stop(shard, pid)
                else:
                    self._kill(shard, pid)

    async def _supervisor_kills(self, supervisor: KillableSupervisor) -> None:
        """SIGKILL the supervisor, start a new one on the same data dir; again and again.

        The restart is shielded: a run ending mid-restart must still end with a cluster.
        """
        while True:
            await trio.sleep(self.supervisor_kill_interval * (0.75 + 0.5 * self.rng.random()))
            async with self._signalling:
                with trio.CancelScope(shield=True):
                    pid = supervisor.kill_supervisor()
                    event = self._record(SUPERVISOR, "supervisor-kill", pid, shards=self.shards)
                    self.log(f"[chaos {event.at:7.1f}s] SIGKILL the supervisor (pid {pid})")
                    try:
                        await supervisor.restart_supervisor()
                    except Exception as exc:  # reported as unhealthy; no more kills
                        self.problems.append(f"supervisor did not come back: {exc}")
                        self.log(f"[chaos {self.now():7.1f}s] supervisor did not come back")
                        return
                    event.respawned_after = self.now() - event.at
                    self.log(
                        f"[chaos {self.now():7.1f}s] new supervisor ready after "
                        f"{event.respawned_after:.2f}s"
                    )

    def _record(
        self, shard: str, kind: str, pid: int, *, shards: list[str] | None = None
    ) -> FaultEvent:
        """Note a fault; it stays open until each of `shards` (default: `shard`) served
        a write that started after it."""
        event = FaultEvent(shard=shard, kind=kind, at=self.now(), pid=pid)
        self.events.append(event)
        for down in shards or [shard]:
            self._open.setdefault(down, []).append(event)
        return event

    def _kill(self, shard: str, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        event = self._record(shard, "kill", pid)
        self.log(f"[chaos {event.at:7.1f}s] SIGKILL {shard} (pid {pid})")

    async def _stop(self, shard: str, pid: int) -> None:
        seconds = self.rng.uniform(*self.stop_seconds)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        self._stopped[pid] = shard
        event = self._record(shard, "stop", pid)
        self.log(f"[chaos {event.at:7.1f}s] SIGSTOP {shard} (pid {pid}) for {seconds:.1f}s")
        try:
            await trio.sleep(seconds)
        finally:
            self._continue(pid)
            event.duration = self.now() - event.at

    def _continue(self, pid: int) -> None:
        # Only continue the very process we stopped, still our child: never a reused PID.
        if self._stopped.pop(pid, None) is not None and self.owns(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def resume_all(self) -> None:
        for pid in list(self._stopped):
            self._continue(pid)
