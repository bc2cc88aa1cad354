"""Live SSE sessions served from the commit, without a wake of their task per message.

An SSE session's task (`ShardService._sse`) that has sent everything committed would
otherwise wait on its stream's event, be woken a scheduler pass after the commit that
moves the stream, read the new records and send the chunk. Instead it parks a
`ParkedSse` on its entry (`Entry.polls`, beside parked long-polls) and sleeps: the
commit's own task, right after the commit (`Entry.notify`), reads the new records from
memory, lets the core step the session and queues the chunk on the connection
(`LiveSink`). Whatever that cannot do at once it hands back to the task, which goes on
as before: the connection's unsent answers over their high-water mark (the task's send
waits for room, so a gateway that does not read still holds the shard to that bound),
records no longer in memory or in a fork's source, the stream moving away, the
session's end, or an error. The task keeps what it owns: the session's deadline, its
cancellation, the end of its connection and its counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from ds_cluster.shard.core.model import LiveSession

if TYPE_CHECKING:
    from ds_cluster.shard.streams import Entry


class LiveSink(Protocol):
    """Where a session's chunks go without a task (the shard connection's writer)."""

    def room(self) -> bool:
        """Whether a chunk queued now stays within the connection's high-water mark."""

    def push(self, data: bytes, more: bool) -> None:
        """Queue a chunk (`more`: others follow), after `room` said yes."""


class ParkedSse:
    """One SSE session parked on its entry while it is at the committed tail. Called by
    `Entry.notify` when its stream changed: serves the session (through `changed`) and
    returns True to stay parked, or hands it back to its task (`handed_back` set) and
    returns False."""

    __slots__ = ("changed", "entry", "error", "handed_back", "session", "sink")

    def __init__(
        self,
        entry: Entry,
        session: LiveSession,
        sink: LiveSink,
        changed: Callable[[ParkedSse], bool],
    ) -> None:
        self.entry = entry
        self.session = session
        self.sink = sink
        self.changed = changed
        self.handed_back = trio.Event()  # the task goes on (off the entry by then)
        self.error: Exception | None = None  # what serving it raised, for the task to raise

    def __call__(self) -> bool:
        if self.handed_back.is_set():
            return False
        try:
            if self.changed(self):
                return True
        except Exception as exc:  # the task raises it, as its own step would have
            self.error = exc
        self.handed_back.set()
        return False

    def unpark(self) -> None:
        """Take it off its entry's parked readers, if there (its task stops waiting)."""
        self.handed_back.set()
        self.entry.unpark(self)
