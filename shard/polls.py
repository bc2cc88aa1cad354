"""Long-polls parked on their stream without a task of their own.

A long-poll that must wait (the core answered `Wait`) would otherwise cost the shard a
task, a cancel scope with a deadline and an event, and after the commit that moves the
stream a wake-up of that task a scheduler pass later, before its answer is even built.
Parked, it is a `ParkedPoll` on its entry (`Entry.polls`): the commit's own task answers
it right after the commit (`Entry.notify`), the one task of `PollTimer` answers those whose
timeout passes, and a `cancel` (or the end of its connection) takes it off. What it is
answered is decided by its owner (`ShardService`), as the task would have: the core again,
with `resume=` the Wait.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ds_cluster.shard.core.model import Request, Response, Wait

if TYPE_CHECKING:
    from ds_cluster.shard.streams import Entry

# Answered (or cancelled) polls stay in the timer's heap until their deadline; once they
# are this many and more than half of it, the heap is rebuilt without them.
COMPACT_AT = 1024

Answer = Callable[[Response | Exception], None]  # sends a parked poll's answer, never raises


class ParkedPoll:
    """One waiting long-poll: its request, the core's Wait, its deadline (trio time), and
    how its answer is sent. Called by `Entry.notify` when its stream changed: answers
    (through `changed`) and returns False, or returns True to stay parked."""

    __slots__ = ("answer", "changed", "deadline", "done", "entry", "request", "wait")

    def __init__(
        self,
        entry: Entry,
        request: Request,
        wait: Wait,
        deadline: float,
        answer: Answer,
        changed: Callable[[ParkedPoll], bool],
    ) -> None:
        self.entry = entry
        self.request = request
        self.wait = wait
        self.deadline = deadline
        self.answer = answer
        self.changed = changed
        self.done = False  # answered or cancelled: no longer on its entry

    def __call__(self) -> bool:
        return not self.done and self.changed(self)


class PollTimer:
    """Answers parked polls whose timeout passed: one task for all of them, asleep until
    the earliest deadline."""

    def __init__(self, expire: Callable[[ParkedPoll], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, int, ParkedPoll]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None  # the task's sleep, while it sleeps
        self._dead = 0  # polls in the heap that are done

    def add(self, poll: ParkedPoll) -> None:
        heap = self._heap
        heapq.heappush(heap, (poll.deadline, next(self._order), poll))
        sleep = self._sleep
        if sleep is not None and heap[0][2] is poll:  # earlier than what the task awaits
            sleep.deadline = poll.deadline

    def done(self) -> None:
        """A parked poll was answered or cancelled before its deadline."""
        self._dead += 1
        heap = self._heap
        if self._dead >= COMPACT_AT and self._dead * 2 > len(heap):
            self._heap = [item for item in heap if not item[2].done]
            heapq.heapify(self._heap)
            self._dead = 0

    async def run(self) -> None:
        while True:
            heap = self._heap
            deadline = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=deadline) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            heap = self._heap
            while heap and heap[0][0] <= now:
                poll = heapq.heappop(heap)[2]
                if poll.done:
                    self._dead -= 1
                else:
                    self._expire(poll)
