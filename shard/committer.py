"""Group commit: every write queued while a transaction is committing goes into the next one.

Requests validate against their stream's pending state, queue a `Job`, and wait; the
committer runs one SQLite transaction for everything queued and then releases them all.
A small group on a quick disk commits on the loop itself (cheaper than a thread hop); a
large group (in bytes or in jobs: a loaded shard), or any group after a slow commit, commits
in a worker thread so the shard keeps serving, and gathers the next group, while fsync
runs. A write is acknowledged only after its transaction has committed. If a transaction
fails (disk full, I/O error) every queued job fails and
pending states fall back to what is committed, so nothing acknowledged is lost and
nothing unacknowledged becomes visible.

A storage failure (a commit or a read hit a disk error, or the database could not be
opened at start-up) puts the committer in recovery: queued writes fail at once with
`StorageUnavailable` (they certainly were not applied), reads go on where the old
connections still work, and the database is reopened and probed with a growing delay
until it takes a write again. No restart is needed when the disk comes back.

Appends are journaled (see `shard.store`): once the journal is due, the committer folds it
into the records table in a worker thread between two groups (the next group gathers
meanwhile, and commits right after), and it folds whatever is left once writes pause for
FOLD_IDLE_SECONDS, so that reads scan an empty journal on a quiet shard.

After commits that purged data, the committer returns the freed pages to the filesystem
in small incremental-vacuum steps, in a worker thread, between groups of writes.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import trio

from ds_cluster.common import batch_end, wire
from ds_cluster.common.metrics import Histogram
from ds_cluster.shard.core.model import evolve
from ds_cluster.shard.store import (
    Batch,
    Statement,
    StorageUnavailable,
    Store,
    StreamWrite,
    describe,
    is_storage_error,
)
from ds_cluster.shard.streams import Entry

__all__ = ["Committer", "Job", "StorageUnavailable", "StreamMoving"]

log = logging.getLogger(__name__)

TOUCH_FLUSH_SECONDS = 5.0  # how long a read-refreshed TTL may stay only in memory
INLINE_BATCH_BYTES = 256 * 1024  # groups with more record bytes commit in a worker thread
# Groups of more jobs than this commit in a worker thread, so that one commit holds the
# loop for a millisecond or two at most. Up to it they commit on the loop: the thread hop
# and the GIL handoffs around the commit's statements cost more than the overlap of the
# fsync with the loop's work gains (64 connections of 100 B appends, wrk, alternated with
# a limit of 8, which sent nearly every group of a loaded shard to the thread: 2 shards
# 154/160/139 -> 128/115/174 us of shard CPU per append, 3,487/3,767/2,529 ->
# 3,941/4,224/2,719 appends/s; 1 shard, where groups are near 64, the same within noise).
INLINE_MAX_JOBS = 64
INLINE_COMMIT_SECONDS = 0.010  # a commit on the loop slower than this (a slow disk)...
SLOW_COMMITS_IN_A_ROW = 3  # ...this many times in a row (one can be a preempted process)...
INLINE_RETRY_SECONDS = 5.0  # ...sends commits to the thread for this long
REOPEN_FIRST_DELAY = 0.05  # after a storage failure, the first reopen attempt...
REOPEN_MAX_DELAY = 1.0  # ...and the longest wait between attempts (doubling in between)
VACUUM_MIN_FREE_PAGES = 256  # free pages (4 KiB) worth returning to the filesystem...
VACUUM_STEP_PAGES = 256  # ...in steps of this many, each its own short transaction
FOLD_IDLE_SECONDS = 1.0  # a journal not yet due is folded after this long without writes
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # jobs per group commit
# seconds per group commit
COMMIT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)


MOVING_RETRY_AFTER = 0.2  # seconds a caller told `moving` waits before it retries


class StreamMoving(wire.Moving):
    """The stream is moving to or from this shard: nothing was done; retry shortly
    (answered `err moving` with `a = {"retry_after": ...}`)."""

    def __init__(self, path: str, retry_after: float = MOVING_RETRY_AFTER) -> None:
        super().__init__(f"{path[:100]!r} is moving between shards; retry shortly")
        self.path = path
        self.args_map: wire.Args | None = {"retry_after": retry_after}


def _never(path: str) -> bool:
    return False


def _cannot_abort(_: Any) -> trio.lowlevel.Abort:
    """A commit in flight is waited for, even by a cancelled task (as to_thread does)."""
    return trio.lowlevel.Abort.FAILED


class Job:
    """One request's durable changes, committed atomically with its batch (or those of
    the appends decided on the spot since the last group was taken: `shared_job`).

    `statements` are further bookkeeping for the same transaction (moves, settings), with
    `extra_bytes` the data they carry; `unfenced` marks the moves' own jobs, which may
    write streams that are fenced for requests.

    A plain class with slots, not a dataclass: every append makes one, and the dataclass's
    `__init__` with its six list factories cost 1.4 us of it, this one 0.6."""

    __slots__ = (
        "done",
        "error",
        "extra_bytes",
        "outbox_put",
        "outbox_removed",
        "refs_added",
        "refs_removed",
        "statements",
        "unfenced",
        "writes",
    )

    def __init__(
        self,
        *,
        writes: list[tuple[Entry, StreamWrite]] | None = None,
        refs_added: list[tuple[str, str]] | None = None,
        refs_removed: list[str] | None = None,
        outbox_put: list[tuple[str, str, str]] | None = None,
        outbox_removed: list[str] | None = None,
        statements: list[Statement] | None = None,
        extra_bytes: int = 0,
        unfenced: bool = False,
    ) -> None:
        self.writes = [] if writes is None else writes
        self.refs_added = [] if refs_added is None else refs_added
        self.refs_removed = [] if refs_removed is None else refs_removed
        self.outbox_put = [] if outbox_put is None else outbox_put
        self.outbox_removed = [] if outbox_removed is None else outbox_removed
        self.statements = [] if statements is None else statements
        self.extra_bytes = extra_bytes
        self.unfenced = unfenced
        # Set once the job's group commit is done (or failed): the group's one event,
        # shared by all its jobs and given at submit (an event per append cost a few
        # microseconds each).
        self.done: trio.Event
        self.error: BaseException | None = None

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
        # The running loop's end-of-batch work (set by `run`): sends parked readers' answers.
        self._batch_end: batch_end.BatchEnd
        self._queue: list[Job] = []
        self._queued_done = trio.Event()  # the `done` of the jobs in _queue
        self._queued_requests = 0  # the requests whose writes _queue holds
        # The job in _queue that appends decided on the spot share (`shared_job`), while
        # it is the last one: a job submitted after it closes it, keeping the writes of a
        # stream in the order they were decided.
        self._shared: Job | None = None
        self._wake = trio.Event()
        self._woke_at = -math.inf  # when the last wake was served (idle deadlines count from it)
        self._dirty: dict[str, Entry] = {}
        self._threaded_until = -math.inf  # until then, commits run in a worker thread
        self._slow_in_a_row = 0  # consecutive slow commits on the loop
        self._recovered = trio.Event()  # set while the storage is ok
        if store.failure is None:
            self._recovered.set()
        store.on_failure = self._storage_failed
        self._vacuum_due = False
        # Metrics (`ds_commit_batch_size`, `ds_commit_duration_seconds`): one observation
        # per group commit that carried requests' writes.
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self.durations = Histogram(COMMIT_BUCKETS)
        # Whether a stream may not be written now (moving away or still arriving): set by
        # the service; checked at submit, the one door every write goes through.
        self.fenced: Callable[[str], bool] = _never

    def health(self) -> str:
        """ "ok", or "failed: <reason>" while the storage refuses writes."""
        return self._store.health()

    async def wait_storage_ok(self) -> None:
        """Wait until the database is open and writable."""
        while self._store.failure is not None:
            await self._recovered.wait()

    def _storage_failed(self) -> None:
        if self._recovered.is_set():
            self._recovered = trio.Event()
        self._wake.set()

    def submit(self, job: Job) -> Job:
        """Queue `job`; the caller has already moved each entry's pending state forward.

        Raises StreamMoving (and queues nothing) if the job writes a fenced stream."""
        if not job.unfenced:
            for entry, _write in job.writes:
                if self.fenced(entry.path):
                    raise StreamMoving(entry.path)
        return self.submit_admitted(job)

    def submit_admitted(self, job: Job) -> Job:
        """`submit` of a job whose streams the caller has found not fenced."""
        for entry, write in job.writes:
            entry.pending = write.state
            entry.pending_sid = write.sid
            entry.inflight += 1
        job.done = self._queued_done
        self._queue.append(job)
        self._queued_requests += 1
        self._shared = None  # (later appends go into a job after this one)
        self._wake.set()
        return job

    def shared_job(self) -> Job:
        """The job queued for the next group commit that the appends decided on the spot
        share (`ShardService.decide_now`): a job per append, with its six lists, cost
        about 2k instructions. Its writes are added by the caller and then `admitted`."""
        return self._shared or self._open_shared()

    def _open_shared(self) -> Job:
        """A new shared job, queued (once per group: its callers test `_shared` first)."""
        job = self._shared = Job()
        job.done = self._queued_done
        self._queue.append(job)
        self._wake.set()
        return job

    def admitted(self, entry: Entry, write: StreamWrite) -> None:
        """`write` of `entry`'s stream, just added to the `shared_job`, is queued: its
        fence was checked by the caller under the current ring, without a wait since."""
        entry.pending = write.state
        entry.pending_sid = write.sid
        entry.inflight += 1
        self._queued_requests += 1

    def queue_shared(self, entry: Entry, write: StreamWrite) -> Job:
        """`shared_job`, `write` added to it, and `admitted`, in one call: a plain
        append's (`ShardService.append_typed`), two calls fewer (about 900 instructions).
        The caller checked the fence under the current ring, without a wait since. An
        advancing write (`store.append_write` with `accessed`, whose state is the entry's
        pending base) moves only the entry's pending tail and last access."""
        job = self._shared or self._open_shared()
        job.writes.append((entry, write))
        accessed = write.accessed
        if accessed is None:
            entry.pending = write.state
        else:  # (`state` is the entry's pending base: only its tail moves)
            entry.pending_tail = write.records[-1].end
            entry.pending_access = accessed
            entry.pending_moved = True
        entry.pending_sid = write.sid
        entry.inflight += 1
        self._queued_requests += 1
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
        self._batch_end = batch_end.current()
        self._check_free_pages()
        while True:
            if self._store.failure is not None:
                await self._recover()
                continue
            # One cancel scope serves every wake until its deadline passes (an idle shard):
            # a scope per wake cost a tenth of the committer's loop time. Its deadline is
            # infinite while a wake is served (a commit must not be cancelled) and set again
            # only before waiting for a wake that is not there yet.
            with trio.CancelScope(deadline=self._idle_deadline()) as idle:
                while True:
                    await self._wake.wait()
                    if idle.deadline != math.inf:
                        idle.deadline = math.inf
                    if idle.cancel_called or self._store.failure is not None:
                        break  # the deadline passed as it woke (served below), or recovery
                    self._woke_at = trio.current_time()
                    self._wake = trio.Event()
                    await self._serve()
                    if self._store.failure is not None:
                        break
                    if not self._wake.is_set():
                        idle.deadline = self._idle_deadline()
            if self._store.failure is None:
                self._woke_at = trio.current_time()
                self._wake = trio.Event()
                await self._serve()

    def _idle_deadline(self) -> float:
        """When the loop must act without being woken: pending TTL touches are flushed after
        TOUCH_FLUSH_SECONDS, the journal folded after FOLD_IDLE_SECONDS without writes, and
        a due vacuum step runs now."""
        if self._vacuum_due:
            return -math.inf
        deadline = math.inf
        if self._dirty:
            deadline = self._woke_at + TOUCH_FLUSH_SECONDS
        if self._store.journal_rows:
            deadline = min(deadline, self._woke_at + FOLD_IDLE_SECONDS)
        return deadline

    async def _serve(self) -> None:
        """Commit what is queued (and fold a due journal); else one vacuum step, or a fold
        of what the journal holds."""
        if self._queue or (self._dirty and not self._vacuum_due):
            await self._commit_queued()
            if self._store.fold_due():
                await self._fold()
        elif self._vacuum_due:  # touched TTLs wait for it: they may wait 5 s anyway
            await self._vacuum_step()
        elif self._store.journal_rows:
            await self._fold()

    async def _commit_queued(self) -> None:
        jobs, self._queue = self._queue, []
        requests, self._queued_requests = self._queued_requests, 0
        self._shared = None
        done = self._queued_done
        if jobs:
            self._queued_done = trio.Event()
        batch = Batch()
        streams = batch.streams
        size = 0
        for job in jobs:
            for _entry, write in job.writes:
                streams.append(write)
                if write.accessed is not None:  # (a plain append's one record: no loop)
                    size += len(write.records[0].data)
                    continue
                for record in write.records:
                    size += len(record.data)
            if (
                job.refs_added
                or job.refs_removed
                or job.outbox_put
                or job.outbox_removed
                or job.statements
            ):  # (an append has none of these)
                batch.refs_added += job.refs_added
                batch.refs_removed += job.refs_removed
                batch.outbox_put += job.outbox_put
                batch.outbox_removed += job.outbox_removed
                batch.statements += job.statements
            size += job.extra_bytes
        if self._dirty:
            self._take_touches(batch, jobs)
        started = time.perf_counter()
        try:
            await self._commit(batch, size, requests)
        except Exception as exc:
            log.error("commit of %d requests' writes failed: %s", requests, exc)
            if is_storage_error(exc):
                self._store.mark_failed(describe(exc))
            self._fail(jobs, exc)
            return
        if jobs:
            self.durations.observe(time.perf_counter() - started)
            self.batch_sizes.observe(requests)
        # One pass over the writes: their entries move forward, and whether a stream's
        # data was purged (a delete or a new incarnation) is noted on the way. Streams
        # with parked long-polls are notified after it, so that a poll is answered once,
        # with all that its stream's writes in this group committed.
        purged = False
        polled: list[Entry] = []
        for job in jobs:
            for entry, write in job.writes:
                state = write.state
                old_sid = write.old_sid
                if state is None or (old_sid is not None and old_sid != write.sid):
                    purged = True
                    entry.forget()
                if entry.committed_write(state, write.sid, write.records, write.accessed):
                    polled.append(entry)
        for entry in polled:  # (one answered and emptied its list: the rest do nothing)
            entry.notify()
        if polled:
            # Their answers go to the sockets now: left to the end of the batch they
            # waited for the rest of this task's work (about 55 us of a 1.9 ms live read
            # on an idle shard, 50 msg/s to one long-poll reader).
            self._batch_end.run_due()
        if purged:
            self._check_free_pages()
        self._after_commit(jobs)
        if jobs:
            done.set()

    def _take_touches(self, batch: Batch, jobs: list[Job]) -> None:
        """Move the read-refreshed TTLs waiting in `_dirty` into `batch`, except those of
        streams that `jobs` write (their new state carries it) or that have writes in
        flight."""
        written = {entry.path for job in jobs for entry, _write in job.writes}
        for path, entry in list(self._dirty.items()):
            if path in written or entry.inflight:
                continue
            del self._dirty[path]
            if entry.committed is not None:
                batch.touches.append((path, entry.committed))

    async def _commit(self, batch: Batch, size: int, requests: int) -> None:
        """Run the transaction on the loop when the group is small and commits are quick:
        a thread hop per group costs more CPU than such a commit (see INLINE_MAX_JOBS).
        Else (more than INLINE_BATCH_BYTES or INLINE_MAX_JOBS) run it in a worker
        thread, so the loop keeps serving and gathers the next group while the disk works.
        SLOW_COMMITS_IN_A_ROW commits slower than INLINE_COMMIT_SECONDS on the loop (a slow
        disk, not one preemption) send the next INLINE_RETRY_SECONDS of commits to the
        thread."""
        now = trio.current_time()
        inline = size <= INLINE_BATCH_BYTES and requests <= INLINE_MAX_JOBS
        if inline and now >= self._threaded_until:
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
            await self._commit_in_thread(batch)

    async def _commit_in_thread(self, batch: Batch) -> None:
        """`Store.commit(batch)` in a worker thread, uncancellable like
        `trio.to_thread.run_sync` but without its per-call machinery (capacity limiter,
        context copy, cancel handling): trio's cached idle thread runs it and hands the
        outcome straight back to this task. Loop CPU per hop of a no-op, alternated on a
        loaded 2-core machine: 44-77 us through to_thread, 32-56 us this way (a
        long-lived thread fed by a SimpleQueue measured the same as this; the rest is the
        loop's wake-up by the thread)."""
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: Any) -> None:  # in the worker thread
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        trio.lowlevel.start_thread_soon(functools.partial(self._store.commit, batch), deliver)
        await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    # -- storage recovery ------------------------------------------------------------------

    async def _recover(self) -> None:
        """Refuse writes at once while the storage is failed, and reopen the database with
        a doubling delay until it opens and takes a probe write."""
        delay = REOPEN_FIRST_DELAY
        failed_at = trio.current_time()
        while True:
            next_try = trio.current_time() + delay
            while True:
                self._fail([], StorageUnavailable(self._store.failure or "storage failed"))
                if trio.current_time() >= next_try:
                    break
                with trio.move_on_at(next_try):
                    await self._wake.wait()
                self._wake = trio.Event()
            try:
                connections = await trio.to_thread.run_sync(self._store.connect)
            except StorageUnavailable as exc:
                if str(exc) != self._store.failure:
                    log.warning("storage still unavailable: %s", exc)
                self._store.failure = str(exc)
                delay = min(delay * 2, REOPEN_MAX_DELAY)
                continue
            self._store.install(connections)
            log.info("storage ok again after %.1f s", trio.current_time() - failed_at)
            self._recovered.set()
            self._check_free_pages()
            return

    # -- reclaiming space ----------------------------------------------------------------

    def _check_free_pages(self) -> None:
        try:
            free = self._store.freelist_pages()
        except Exception as exc:  # the next commit or read reports a storage failure
            log.debug("cannot count free pages: %s", exc)
            return
        self._vacuum_due = free >= VACUUM_MIN_FREE_PAGES

    async def _vacuum_step(self) -> None:
        """One short vacuum transaction, in a worker thread (it writes and syncs about
        VACUUM_STEP_PAGES pages); the loop goes on serving, and queued writes commit
        before the next step."""
        try:
            left = await trio.to_thread.run_sync(self._store.vacuum_step, VACUUM_STEP_PAGES)
        except Exception as exc:
            log.error("incremental vacuum failed: %s", exc)
            if is_storage_error(exc):
                self._store.mark_failed(describe(exc))
            self._vacuum_due = False
            return
        self._vacuum_due = left > 0

    async def _fold(self) -> None:
        """Fold the journal into the records table, in a worker thread: it takes a few tens
        of milliseconds, during which the loop keeps serving and the next group gathers."""
        try:
            await trio.to_thread.run_sync(self._store.fold)
        except Exception as exc:
            log.error("folding the journal failed: %s", exc)
            if is_storage_error(exc):
                self._store.mark_failed(describe(exc))

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        # Later queued jobs were validated against states that now will never exist.
        failed = jobs + self._queue
        self._queue = []
        self._queued_requests = 0
        self._shared = None
        if failed:
            self._queued_done = trio.Event()  # the failed jobs' events are set below
        for job in failed:
            job.error = exc
            for entry, _write in job.writes:
                entry.pending = entry.committed
                entry.pending_sid = entry.committed_sid
                entry.write_done()
            job.done.set()
