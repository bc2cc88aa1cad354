"""Fault injection for chaos runs: SIGKILL or SIGSTOP a random shard at intervals.

Only processes the run itself launched are touched (their PIDs come from the
supervisor). Each fault is recorded with the time the shard took to serve a write again:
the first acknowledged write to one of its streams whose request *started* after the
fault (a reply already on its way when the signal landed proves nothing).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Callable

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
    ) -> None:
        self.child_pids = child_pids
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
            if started_rel >= event.at:
                event.recovered_after = now - event.at
            else:
                still_open.append(event)
        self._open[shard] = still_open

    async def run(self) -> None:
        """Inject faults until cancelled; a stopped shard is always continued on the way out."""
        try:
            while True:
                await trio.sleep(self.kill_interval * (0.75 + 0.5 * self.rng.random()))
                candidates = [s for s in self.shards if not self._open.get(s)]
                if not candidates:
                    continue  # everyone is still recovering; skip this tick
                shard = self.rng.choice(candidates)
                pid = self.child_pids().get(shard)
                if pid is None or not is_own_child(pid):
                    continue  # between incarnations, or not ours to signal
                if self.rng.random() < self.stop_probability:
                    await self._stop(shard, pid)
                else:
                    self._kill(shard, pid)
        finally:
            self.resume_all()

    def _record(self, shard: str, kind: str, pid: int) -> FaultEvent:
        event = FaultEvent(shard=shard, kind=kind, at=self.now(), pid=pid)
        self.events.append(event)
        self._open.setdefault(shard, []).append(event)
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
        if self._stopped.pop(pid, None) is not None and is_own_child(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def resume_all(self) -> None:
        for pid in list(self._stopped):
            self._continue(pid)
