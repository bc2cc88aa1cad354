"""Group commit: every write queued while a transaction is committing goes into the next one.

Requests validate against their stream's pending state, queue a `Job`, and wait; the
committer runs one SQLite transaction for everything queued and then releases them all.
A small group on a quick disk commits on the loop itself (cheaper than a thread hop); a
large group, or any group after a slow commit, commits in a worker thread so the shard
keeps serving while fsync runs. A write is acknowledged only after its transaction has
committed. If a transaction fails (disk full, I/O error) every queued job fails and
pending states fall back to what is committed, so nothing acknowledged is lost and
nothing unacknowledged becomes visible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from shard.core.model import evolve
from shard.store import Batch, Store, StreamWrite
from shard.streams import Entry

log = logging.getLogger(__name__)

TOUCH_FLUSH_SECONDS = 5.0  # how long a read-refreshed TTL may stay only in memory
INLINE_BATCH_BYTES = 256 * 1024  # groups with more record bytes commit in a worker thread
INLINE_COMMIT_SECONDS = 0.010  # a commit on the loop slower than this (a slow disk)...
SLOW_COMMITS_IN_A_ROW = 3  # ...this many times in a row (one can be a preempted process)...
INLINE_RETRY_SECONDS = 5.0  # ...sends commits to the thread for this long


class StorageUnavailable(Exception):
    """The shard could not commit; the write did not happen."""


@dataclass(eq=False)
class Job:
    """One request's durable changes, committed atomically with its batch."""

    writes: list[tuple[Entry, StreamWrite]] = field(default_factory=list)
    refs_added: list[tuple[str, str]] = field(default_factory=list)
    refs_removed: list[str] = field(default_factory=list)
    outbox_put: list[tuple[str, str, str]] = field(default_factory=list)
    outbox_removed: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise StorageUnavailable(str(self.error)) from self.error


class Committer:
    def __init__(
        self,
        store: Store,
        after_commit: Callable[[list[Job]], None],
    ) -> None:
        self._store = store
        self._after_commit = after_commit
        self._queue: list[Job] = []
        self._wake = trio.Event()
        self._dirty: dict[str, Entry] = {}
        self._threaded_until = -math.inf  # until then, commits run in a worker thread
        self._slow_in_a_row = 0  # consecutive slow commits on the loop

    def submit(self, job: Job) -> Job:
        """Queue `job`; the caller has already moved each entry's pending state forward."""
        for entry, write in job.writes:
            entry.pending = write.state
            entry.pending_sid = write.sid
            entry.inflight += 1
        self._queue.append(job)
        self._wake.set()
        return job

    def touch(self, entry: Entry, now: float) -> None:
        """A read refreshed a TTL stream's countdown; persist it lazily."""
        committed = entry.committed
        if committed is None or committed.ttl is None:
            return
        touched = evolve(committed, last_access=now)
        if entry.pending is committed:
            entry.pending = touched
        elif entry.pending is not None:
            entry.pending = evolve(entry.pending, last_access=now)
        entry.committed = touched
        self._dirty[entry.path] = entry

    async def run(self) -> None:
        while True:
            timeout = TOUCH_FLUSH_SECONDS if self._dirty else math.inf
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._queue or self._dirty:
                await self._commit_queued()

    async def _commit_queued(self) -> None:
        jobs, self._queue = self._queue, []
        batch = Batch()
        written: set[str] = set()
        size = 0
        for job in jobs:
            for entry, write in job.writes:
                batch.streams.append(write)
                written.add(entry.path)
                size += sum(len(record.data) for record in write.records)
            batch.refs_added += job.refs_added
            batch.refs_removed += job.refs_removed
            batch.outbox_put += job.outbox_put
            batch.outbox_removed += job.outbox_removed
        for path, entry in list(self._dirty.items()):
            if path in written or entry.inflight:
                continue
            del self._dirty[path]
            if entry.committed is not None:
                batch.touches.append((path, entry.committed))
        try:
            await self._commit(batch, size)
        except Exception as exc:
            log.error("commit of %d jobs failed: %s", len(jobs), exc)
            self._fail(jobs, exc)
            return
        for job in jobs:
            for entry, write in job.writes:
                entry.committed = write.state
                entry.committed_sid = write.sid if write.state is not None else None
                if write.state is None or write.old_sid not in (None, write.sid):
                    entry.forget()
                entry.remember(write.records)
                entry.write_done()
                entry.notify()
        self._after_commit(jobs)
        for job in jobs:
            job.done.set()

    async def _commit(self, batch: Batch, size: int) -> None:
        """Run the transaction on the loop when the group is small and commits are quick:
        a thread hop per group costs more CPU than such a commit (measured: 10% less CPU
        per append on this project's 2-core machine, where fsync takes 0.1 ms). Else
        run it in a worker thread, so the loop keeps serving while the disk works.
        SLOW_COMMITS_IN_A_ROW commits slower than INLINE_COMMIT_SECONDS on the loop (a slow
        disk, not one preemption) send the next INLINE_RETRY_SECONDS of commits to the
        thread."""
        now = trio.current_time()
        if size <= INLINE_BATCH_BYTES and now >= self._threaded_until:
            self._store.commit(batch)
            took = trio.current_time() - now
            self._slow_in_a_row = self._slow_in_a_row + 1 if took > INLINE_COMMIT_SECONDS else 0
            if self._slow_in_a_row >= SLOW_COMMITS_IN_A_ROW:
                log.info(
                    "%d commits in a row took over %.0f ms on the loop (the last %.1f ms); "
                    "committing in a worker thread for %ss",
                    self._slow_in_a_row,
                    INLINE_COMMIT_SECONDS * 1000,
                    took * 1000,
                    INLINE_RETRY_SECONDS,
                )
                self._slow_in_a_row = 0
                self._threaded_until = trio.current_time() + INLINE_RETRY_SECONDS
        else:
            await trio.to_thread.run_sync(self._store.commit, batch)

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        # Later queued jobs were validated against states that now will never exist.
        failed = jobs + self._queue
        self._queue = []
        for job in failed:
            job.error = exc
            for entry, _write in job.writes:
                entry.pending = entry.committed
                entry.pending_sid = entry.committed_sid
                entry.write_done()
            job.done.set()
