"""Work done when the trio loop's current batch of task steps ends, before it waits for I/O.

Tasks made runnable together run in one batch. A connection's frame writer that queues
frames during a batch asks to be flushed at its end (`BatchEnd.due`): everything the batch
queued then goes to the socket in one write, without waking the writer's task and waiting
for the next batch. It is a trio instrument with one hook, so it costs one call per
scheduler pass and nothing per task step; one serves every writer of a run (`current`).

A task that has just queued frames nobody should wait for, while it goes on working, does
the due work itself (`run_due`): the committer, after answering the readers parked on the
streams a commit moved, before it wakes the commit's writers and tidies up.

The hook runs after the loop has decided how long to wait for I/O, so what it does must
not make a task runnable directly (that task would wait for the next I/O event): wake
tasks through the run's token (`run_sync_soon`), which ends the wait at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)


class BatchEnd(trio.abc.Instrument):
    """Calls each function in `due` once, when the running batch ends."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due: list[Callable[[], None]] = []

    def before_io_wait(self, timeout: float) -> None:
        self.run_due()

    def run_due(self) -> None:
        """Do the due work now (from a task, or at the end of the batch)."""
        if self.due:
            due, self.due = self.due, []
            for fn in due:
                try:
                    fn()
                except Exception:  # an instrument that raises is removed by trio
                    log.exception("end-of-batch work failed")


_CURRENT: trio.lowlevel.RunVar[BatchEnd] = trio.lowlevel.RunVar("batch_end")


def current() -> BatchEnd:
    """The running trio loop's `BatchEnd`, installed on first use."""
    try:
        return _CURRENT.get()
    except LookupError:
        batch_end = BatchEnd()
        trio.lowlevel.add_instrument(batch_end)
        _CURRENT.set(batch_end)
        return batch_end
