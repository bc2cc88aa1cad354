"""Scale events for chaos runs: the shard count goes up and down while the load runs.

At random intervals (mean `--scale-interval` seconds) the run asks the cluster's
supervisor, over its control socket, for another shard count within `--scale-range
LO:HI` (up from LO, down from HI, else either way), or the next count of `--scale-to
N,M,...` (then no more), exactly as `ds-cluster scale` does,
and records how long the scale took and how many streams and bytes moved. While a scale
runs, shard faults may hit the old and the new shards alike (the source and the target
of a move); once it is done, faults pick among the shards of the new ring.

A scale that fails, or a supervisor that cannot be asked, is a health problem of the
run. A scale interrupted by a supervisor kill is finished by the next supervisor (it is
journaled); the event then counts as done once the next scale request returns.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from ds_cluster.supervisor import control

IDLE_TIMEOUT = 120.0  # the supervisor says something at least every few seconds


@dataclass
class ScaleEvent:
    """One change of shard count, as the supervisor reported it."""

    at: float  # seconds since the run started
    before: int
    after: int
    took: float | None = None  # None: did not finish
    moved_streams: int = 0
    moved_bytes: int = 0
    ok: bool = False
    message: str = ""


def parse_counts(text: str) -> list[int]:
    """`N,M,...` shard counts; ValueError unless each is at least 1."""
    counts = [part.strip() for part in text.split(",")]
    if not counts or not all(c.isdigit() and int(c) >= 1 for c in counts):
        raise ValueError(f"--scale-to {text!r}: expected shard counts N,M,...")
    return [int(c) for c in counts]


def parse_range(text: str) -> tuple[int, int]:
    """`LO:HI` shard counts; ValueError unless 1 <= LO < HI."""
    lo, sep, hi = text.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 1 <= int(lo) < int(hi):
        raise ValueError(f"--scale-range {text!r}: expected LO:HI with 1 <= LO < HI")
    return int(lo), int(hi)


class ScaleDriver:
    def __init__(
        self,
        data_dir: Path,
        shard_range: tuple[int, int],
        interval: float,
        rng: random.Random,
        *,
        start: float,
        shards: int,
        log: Callable[[str], None],
        on_begin: Callable[[int], None],
        on_done: Callable[[int], None],
        sequence: list[int] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.lo, self.hi = shard_range
        self.interval = interval
        self.rng = rng
        self.start = start
        self.shards = shards  # the count the cluster serves on
        self.log = log
        self.on_begin = on_begin  # (target count) when a scale is asked for
        self.on_done = on_done  # (count served) when it finished
        self.sequence = list(sequence) if sequence is not None else None
        self.events: list[ScaleEvent] = []
        self.problems: list[str] = []

    def now(self) -> float:
        return trio.current_time() - self.start

    def _next_count(self) -> int | None:
        if self.sequence is not None:
            return self.sequence.pop(0) if self.sequence else None
        if self.shards <= self.lo:
            return self.shards + 1
        if self.shards >= self.hi:
            return self.shards - 1
        return self.shards + self.rng.choice((-1, 1))

    async def run(self) -> None:
        """Scale until cancelled; a scale in progress is seen through first (shielded)."""
        while True:
            await trio.sleep(self.interval * (0.75 + 0.5 * self.rng.random()))
            target = self._next_count()
            if target is None:
                return  # the sequence is done
            with trio.CancelScope(shield=True):
                await self.scale_once(target)

    async def scale_once(self, target: int) -> ScaleEvent:
        event = ScaleEvent(at=self.now(), before=self.shards, after=target)
        self.events.append(event)
        self.log(f"[chaos {event.at:7.1f}s] scale {self.shards} -> {target} shards")
        self.on_begin(target)
        started = trio.current_time()
        with trio.move_on_after(IDLE_TIMEOUT * 5):
            while True:
                try:
                    await self._ask(event, target)
                    break
                except control.ControlError as exc:
                    # The supervisor was killed (or is restarting): the next one finishes
                    # the journaled scale, and a request for the same count joins it.
                    event.message = f"{exc}"
                    await trio.sleep(1.0)
        if event.ok:
            event.took = trio.current_time() - started
            self.shards = target
            self.on_done(target)
            self.log(
                f"[chaos {self.now():7.1f}s] now {target} shards after {event.took:.1f}s: "
                f"moved {event.moved_streams} streams, {event.moved_bytes} bytes"
            )
        else:
            self.problems.append(
                f"scale {event.before} -> {target} at {event.at:.1f}s failed: {event.message}"
            )
            self.log(f"[chaos {self.now():7.1f}s] scale to {target} FAILED: {event.message}")
        return event

    async def _ask(self, event: ScaleEvent, target: int) -> None:
        request = {"op": "scale", "shards": target}
        async for line in control.request(self.data_dir, request, idle_timeout=IDLE_TIMEOUT):
            figures = line.get("progress")
            if isinstance(figures, dict):
                event.moved_streams = int(figures.get("moved_streams", 0))
                event.moved_bytes = int(figures.get("moved_bytes", 0))
            if line.get("type") == "result":
                event.ok = bool(line.get("ok"))
                event.message = str(line.get("message", ""))
