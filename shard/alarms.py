"""The persisted alarm loop: streams expire (TTL / Expires-At) without any request.

Deadlines live in the database (`streams.deadline`), so a restarted shard re-arms every
alarm from there. In memory a heap holds (deadline, path); an alarm that fires early
(the TTL was refreshed since) just re-arms at the stream's current deadline.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Awaitable, Callable

import trio


class AlarmLoop:
    def __init__(self, fire: Callable[[str], Awaitable[float | None]]) -> None:
        """`fire(path)` expires the stream if due and returns its next deadline, if any."""
        self._fire = fire
        self._heap: list[tuple[float, str]] = []
        self._armed: dict[str, float] = {}
        self._wake = trio.Event()

    def arm(self, path: str, deadline: float | None) -> None:
        """Make sure an alarm for `path` fires no later than `deadline`."""
        if deadline is None:
            return
        current = self._armed.get(path)
        if current is not None and current <= deadline:
            return  # an earlier alarm will fire and re-arm
        self._armed[path] = deadline
        heapq.heappush(self._heap, (deadline, path))
        if self._heap[0][1] == path:
            self._wake.set()

    async def run(self) -> None:
        while True:
            delay = self._heap[0][0] - time.time() if self._heap else math.inf
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            deadline, path = heapq.heappop(self._heap)
            if self._armed.get(path) != deadline:
                continue  # superseded by an earlier alarm
            del self._armed[path]
            next_deadline = await self._fire(path)
            self.arm(path, next_deadline)
