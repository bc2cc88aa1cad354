"""Which scheduler batch of the trio loop is running: a counter bumped after each I/O wait.

Tasks made runnable together run in one batch, between two I/O waits. Code that wants to
act at once for the first event of a batch, and gather the others of the same batch (a
socket write, say), compares the counter with the one it noted last time. It is a trio
instrument with one hook, so it costs one call per scheduler pass and nothing per task
step; one counter serves every user in a run (`current`).
"""

from __future__ import annotations

import trio


class BatchCounter(trio.abc.Instrument):
    """`count` grows by one after every I/O wait of the run it is installed in."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def after_io_wait(self, timeout: float) -> None:
        self.count += 1


_COUNTER: trio.lowlevel.RunVar[BatchCounter] = trio.lowlevel.RunVar("batch_counter")


def current() -> BatchCounter:
    """The running trio loop's counter, installed on first use."""
    try:
        return _COUNTER.get()
    except LookupError:
        counter = BatchCounter()
        trio.lowlevel.add_instrument(counter)
        _COUNTER.set(counter)
        return counter
