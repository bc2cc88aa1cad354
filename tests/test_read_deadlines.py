"""`gateway.read_deadlines` under trio's mock clock: a read waiting past its deadline is
ended at that deadline, one that stopped waiting (or waits longer) is not, and the heap
stays bounded however often waits move earlier and connections close.
(The deadlines' effect on real connections: tests/test_http1.py and
tests/test_hardening_gateway.py.)"""

from __future__ import annotations

from math import inf

import trio
import trio.testing

from ds_cluster.gateway.read_deadlines import MIN_PRUNE, ReadDeadlines


class _Reader:
    def __init__(self) -> None:
        self.wait_until = inf
        self.timer_at = inf
        self.expired_at: list[float] = []

    def read_expired(self) -> None:
        self.expired_at.append(trio.current_time())


def test_expiry_and_rearming() -> None:
    async def main() -> None:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        deadlines = ReadDeadlines()
        waiting, done, later = _Reader(), _Reader(), _Reader()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deadlines.run)
            await trio.testing.wait_all_tasks_blocked()
            deadlines.wait(waiting, 5.0)
            deadlines.wait(done, 5.0)
            deadlines.wait(later, 5.0)
            done.wait_until = inf  # its read ended in time
            clock.jump(3.0)
            deadlines.wait(later, 9.0)  # a new wait, due later: no new entry
            assert len(deadlines) == 3
            clock.jump(2.5)
            await trio.testing.wait_all_tasks_blocked()
            assert waiting.expired_at == [5.5]
            assert done.expired_at == later.expired_at == []
            assert later.timer_at == 9.0  # armed again at its own deadline
            deadlines.wait(done, 6.0)  # earlier than anything due: the task wakes for it
            clock.jump(1.0)
            await trio.testing.wait_all_tasks_blocked()
            assert done.expired_at == [6.5]
            clock.jump(3.0)
            await trio.testing.wait_all_tasks_blocked()
            assert later.expired_at == [9.5]
            assert len(deadlines) == 0
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock())


def test_heap_stays_bounded() -> None:
    async def main() -> None:
        deadlines = ReadDeadlines()
        readers = [_Reader() for _ in range(10)]
        for step in range(10_000):
            reader = readers[step % 10]
            deadlines.wait(reader, 1_000_000.0 - step)  # always earlier: a new entry
            if step % 7 == 0:
                deadlines.forget(reader)
        assert len(deadlines) <= 2 * (MIN_PRUNE + len(readers)) + 1

    trio.run(main, clock=trio.testing.MockClock())
