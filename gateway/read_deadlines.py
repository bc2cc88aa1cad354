"""The read deadlines of a server's HTTP/1.1 connections, kept by one task.

A connection waits for its client with a deadline (the next request head, the rest of a
body, `gateway.http1`), once or more per request. A trio deadline set before each wait
and reset after it costs two updates of trio's deadline heap and a context manager each
time, a few microseconds per request. Here a wait only notes until when it may last
(`Reader.wait_until`); `ReadDeadlines.run`, one task per server, wakes at the earliest
deadline noted and ends the reads still waiting past theirs (`Reader.read_expired`).

Each connection has at most one live entry in the heap (`Reader.timer_at`): a wait due
no earlier than it adds nothing, one due earlier adds an entry (the older goes stale),
and an entry that comes due while its connection waits for later is armed again at that
later time. Stale entries (moved earlier, or of closed connections) are skipped when
they come due, and pruned once they are more than half of the heap, so the heap stays
within a small multiple of the open connections.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from itertools import count
from math import inf
from typing import Protocol

import trio

MIN_PRUNE = 64  # stale entries tolerated whatever the heap's size


class Reader(Protocol):
    """What a connection keeps for its read deadline."""

    wait_until: float  # the deadline of the wait in progress (inf: not waiting)
    timer_at: float  # when its live heap entry comes due (inf: it has none)

    def read_expired(self) -> None:
        """Its wait outlasted its deadline: end it (cancel the read)."""


class ReadDeadlines:
    """One server's read deadlines (`run` is the task that keeps them)."""

    __slots__ = ("_heap", "_order", "_scope", "_stale", "_wake_at")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Reader]] = []
        self._order = count()  # ties between equal deadlines (readers do not compare)
        self._stale = 0
        self._scope: trio.CancelScope | None = None  # the task's sleep
        self._wake_at = inf

    def __len__(self) -> int:
        """Entries in the heap (live and stale)."""
        return len(self._heap)

    def wait(self, reader: Reader, until: float) -> None:
        """`reader` starts a wait that must end by `until` (inf: none)."""
        reader.wait_until = until
        if until < reader.timer_at:
            self._arm(reader, until)

    def forget(self, reader: Reader) -> None:
        """`reader` is closed: its entry goes stale."""
        reader.wait_until = inf
        if reader.timer_at != inf:
            reader.timer_at = inf
            self._went_stale()

    def _arm(self, reader: Reader, until: float) -> None:
        replaced = reader.timer_at != inf
        reader.timer_at = until
        heappush(self._heap, (until, next(self._order), reader))
        if replaced:
            self._went_stale()
        if until < self._wake_at:
            self._wake_at = until
            if self._scope is not None:
                self._scope.deadline = until

    def _went_stale(self) -> None:
        self._stale += 1
        if self._stale > MIN_PRUNE and self._stale * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].timer_at == entry[0]]
            heapify(self._heap)
            self._stale = 0

    async def run(self) -> None:
        """End the reads that wait past their deadline, until cancelled."""
        while True:
            with trio.CancelScope(deadline=self._wake_at) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, reader = heappop(heap)
            if reader.timer_at != at:
                self._stale -= 1
                continue
            reader.timer_at = inf
            until = reader.wait_until
            if until <= now:
                reader.read_expired()
            elif until != inf:  # waiting, for longer than its entry said: due later
                reader.timer_at = until
                heappush(heap, (until, next(self._order), reader))
        self._wake_at = heap[0][0] if heap else inf
