"""Jitter for retry delays: many callers that lost the same peer at once must not all come
back at the same instant.

One formula for every retry loop (a shard connection of the RPC client, a shard's fork
releases): the delay is drawn between half of the backoff and all of it, so a loop never
waits longer than its backoff says and never retries in step with the others.
"""

from __future__ import annotations

import random

import trio

JITTER_LOW = 0.5  # the shortest delay, as a fraction of the backoff


def jittered(backoff: float) -> float:
    """A delay drawn uniformly from [JITTER_LOW * backoff, backoff]."""
    return backoff * random.uniform(JITTER_LOW, 1.0)


class RetryPacer:
    """The waits of a delivery loop (fork releases, subscription notices): idle until
    something new is due (`wake`); after a round that failed, a jittered delay doubling
    from `low` to `high`, cut short by a wake; back to `low` after a round that worked."""

    def __init__(self, low: float, high: float) -> None:
        self._low = low
        self._high = high
        self.delay = low
        self._wake = trio.Event()

    def wake(self) -> None:
        """Something new is due: end the current wait."""
        self._wake.set()

    async def idle(self) -> None:
        """Wait for the next `wake`."""
        await self._wake.wait()
        self._wake = trio.Event()

    async def after_failure(self) -> None:
        """Wait out the backoff (or until a wake), then double it."""
        with trio.move_on_after(jittered(self.delay)):
            await self._wake.wait()
        self._wake = trio.Event()
        self.delay = min(self.delay * 2, self._high)

    def after_success(self) -> None:
        self.delay = self._low
