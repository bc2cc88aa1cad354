"""The group committer: where a transaction runs (on the loop when the group is small and
commits are quick, in a worker thread when the group is large or after slow commits), how
it rides out storage that fails, and how it gives deleted data's space back.

Real SQLite (`shard.store.Store` in a temporary directory); a slow disk is simulated by a
store whose commit sleeps after doing the real work, an unwritable one with `chattr +i`.
Whatever happens, every write is durable when its job is released: a second Store on the
same file reads it back.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from ds_cluster.common import batch_end
from ds_cluster.shard import committer as committer_module
from ds_cluster.shard.committer import Committer, Job
from ds_cluster.shard.core.model import Record, StreamState
from ds_cluster.shard.store import Batch, StorageUnavailable, Store, StreamWrite
from ds_cluster.shard.streams import Entry

MAIN = threading.get_ident()


class RecordingStore(Store):
    """A real Store that notes which thread each commit ran on, and can be made slow."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.threads: list[int] = []
        self.delay = 0.0

    def commit(self, batch: Batch) -> None:
        super().commit(batch)
        self.threads.append(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)


def job_for(entry: Entry, sid: int, data: bytes) -> Job:
    tail = entry.pending.tail if entry.pending else 0
    state = StreamState(
        path=entry.path,
        content_type="application/octet-stream",
        created_at=1.0,
        tail=tail + len(data),
    )
    write = StreamWrite(entry.path, sid, sid, state, (Record(tail, tail + len(data), data),))
    return Job(writes=[(entry, write)])


async def run_jobs(committer: Committer, jobs: list[Job]) -> None:
    for job in jobs:
        committer.submit(job)
    for job in jobs:
        await job.wait()


async def test_commit_placement_follows_group_size_and_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(committer_module, "INLINE_RETRY_SECONDS", 0.3)
    # "Slow" well above what a real commit takes on a loaded machine, so only the
    # commits this test delays count as slow.
    monkeypatch.setattr(committer_module, "INLINE_COMMIT_SECONDS", 0.25)
    store = RecordingStore(tmp_path)
    committer = Committer(store, lambda jobs: None)
    entry = Entry("s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)

        # Small groups on a quick disk: on the loop's own thread.
        for n in range(3):
            await run_jobs(committer, [job_for(entry, 1, b"x%d" % n)])
        assert store.threads == [MAIN] * 3

        # A group above INLINE_BATCH_BYTES: in a worker thread.
        big = b"y" * (committer_module.INLINE_BATCH_BYTES + 1)
        await run_jobs(committer, [job_for(entry, 1, big)])
        assert store.threads[-1] != MAIN

        # A group of more than INLINE_MAX_JOBS small writes (a loaded shard): in a worker
        # thread too; one of exactly that many stays on the loop.
        others = [Entry(f"o{n}") for n in range(committer_module.INLINE_MAX_JOBS + 1)]
        at_most = [job_for(e, 10 + n, b"m") for n, e in enumerate(others[:-1])]
        await run_jobs(committer, at_most)
        assert store.threads[-1] == MAIN
        more = [job_for(e, 10 + n, b"n") for n, e in enumerate(others)]
        await run_jobs(committer, more)
        assert store.threads[-1] != MAIN

        # Slow commits on the loop, SLOW_COMMITS_IN_A_ROW of them, send the following
        # ones to the thread (a single slow one does not)...
        store.delay = committer_module.INLINE_COMMIT_SECONDS * 1.5
        await run_jobs(committer, [job_for(entry, 1, b"one")])
        store.delay = 0.0
        await run_jobs(committer, [job_for(entry, 1, b"fast")])
        store.delay = committer_module.INLINE_COMMIT_SECONDS * 1.5
        for n in range(committer_module.SLOW_COMMITS_IN_A_ROW):
            await run_jobs(committer, [job_for(entry, 1, b"slow%d" % n)])
        assert store.threads[-5:] == [MAIN] * 5
        store.delay = 0.0
        await run_jobs(committer, [job_for(entry, 1, b"after")])
        assert store.threads[-1] != MAIN
        # ...until INLINE_RETRY_SECONDS have passed.
        await trio.sleep(0.35)
        await run_jobs(committer, [job_for(entry, 1, b"again")])
        assert store.threads[-1] == MAIN
        nursery.cancel_scope.cancel()

    # Every acknowledged write is in the database, wherever it was committed.
    reopened = Store(tmp_path)
    data = b"".join(r.data for r in reopened.read_records(1, 0, 10 * 1024 * 1024))
    assert data == b"x0x1x2" + big + b"onefastslow0slow1slow2afteragain"
    reopened.close()
    store.close()


async def test_a_job_queued_during_a_commit_is_released_by_its_own_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs share their group's done event: one queued while a group commits (in a worker
    thread) belongs to the next group and is released only once that one has committed."""
    monkeypatch.setattr(committer_module, "INLINE_MAX_JOBS", 0)  # every group in the thread
    store = RecordingStore(tmp_path)
    committer = Committer(store, lambda jobs: None)
    entry = Entry("s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        store.delay = 1.0  # each commit stays in its thread this long after committing
        first = committer.submit(job_for(entry, 1, b"first"))
        with trio.fail_after(60):
            while not store.threads:  # the first group has committed and is sleeping
                await trio.sleep(0.01)
        second = committer.submit(job_for(entry, 1, b"second"))
        assert not first.done.is_set() and not second.done.is_set()
        with trio.fail_after(60):
            await first.wait()
        assert not second.done.is_set()  # its own commit is still in its thread
        store.delay = 0.0
        with trio.fail_after(60):
            await second.wait()
        assert len(store.threads) == 2
        nursery.cancel_scope.cancel()
    reopened = Store(tmp_path)
    assert [r.data for r in reopened.read_records(1, 0, 1024)] == [b"first", b"second"]
    reopened.close()
    store.close()


def purge_job(entry: Entry, sid: int) -> Job:
    return Job(writes=[(entry, StreamWrite(entry.path, sid, sid, None))])


async def test_freed_pages_go_back_to_the_filesystem_after_a_purge(tmp_path: Path) -> None:
    store = Store(tmp_path)
    committer = Committer(store, lambda jobs: None)
    entry = Entry("big")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        for _ in range(16):
            await run_jobs(committer, [job_for(entry, 1, b"z" * 1024 * 1024)])
        full = store.path.stat().st_size + (tmp_path / "shard.db-wal").stat().st_size
        await run_jobs(committer, [purge_job(entry, 1)])
        with trio.fail_after(20):
            while store.freelist_pages():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    store.close()  # the last connection checkpoints into the database file
    assert store.path.stat().st_size < 1024 * 1024 < full
    reopened = Store(tmp_path)
    assert reopened.read_records(1, 0, 1 << 30) == []
    reopened.close()


async def test_store_that_cannot_open_refuses_writes_and_opens_later(tmp_path: Path) -> None:
    """A data directory that cannot be created now (a file is in the way) becomes usable
    later: the committer keeps trying, with no restart."""
    data_dir = tmp_path / "data"
    data_dir.write_text("not a directory")
    store = Store(data_dir)
    assert store.health().startswith("failed: ")
    with pytest.raises(StorageUnavailable):
        store.load_stream("s")
    committer = Committer(store, lambda jobs: None)
    entry = Entry("s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        with pytest.raises(StorageUnavailable):
            await run_jobs(committer, [job_for(entry, 1, b"refused")])
        assert entry.pending is None  # the refused write left nothing behind
        data_dir.unlink()
        with trio.fail_after(10):
            await committer.wait_storage_ok()
        assert committer.health() == "ok"
        await run_jobs(committer, [job_for(entry, 1, b"accepted")])
        nursery.cancel_scope.cancel()
    assert [r.data for r in store.read_records(1, 0, 1024)] == [b"accepted"]
    store.close()


def chattr(flag: str, *paths: Path) -> bool:
    return all(
        subprocess.run(["chattr", flag, str(p)], capture_output=True).returncode == 0 for p in paths
    )


async def test_unwritable_files_fail_writes_at_once_and_recover_by_reopening(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    files = [store.path, tmp_path / "shard.db-wal"]
    committer = Committer(store, lambda jobs: None)
    entry = Entry("s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        await run_jobs(committer, [job_for(entry, 1, b"before")])
        if not chattr("+i", *files):
            chattr("-i", *files)
            pytest.skip("chattr +i is not available here")
        try:
            with pytest.raises(StorageUnavailable):
                await run_jobs(committer, [job_for(entry, 1, b"refused")])
            assert committer.health().startswith("failed: ")
            # While failed, writes are refused at once, without touching the disk.
            started = trio.current_time()
            for _ in range(3):
                with pytest.raises(StorageUnavailable):
                    await run_jobs(committer, [job_for(entry, 1, b"refused")])
            assert trio.current_time() - started < 1.0
            # Reads of committed data still work.
            assert [r.data for r in store.read_records(1, 0, 1024)] == [b"before"]
            await trio.sleep(0.5)  # reopen attempts fail: the files are still immutable
            assert committer.health().startswith("failed: ")
        finally:
            chattr("-i", *files)
        with trio.fail_after(10):
            await committer.wait_storage_ok()
        await run_jobs(committer, [job_for(entry, 1, b"after")])
        nursery.cancel_scope.cancel()
    store.close()
    reopened = Store(tmp_path)
    assert [r.data for r in reopened.read_records(1, 0, 1024)] == [b"before", b"after"]
    reopened.close()


def shared_write(committer: Committer, entry: Entry, sid: int, data: bytes) -> Job:
    """An append decided on the spot: its write added to the shared job, then admitted."""
    own = job_for(entry, sid, data)
    [(_entry, write)] = own.writes
    job = committer.shared_job()
    job.writes.append((entry, write))
    committer.admitted(entry, write)
    return job


async def test_appends_decided_on_the_spot_share_a_job_closed_by_any_other(
    tmp_path: Path,
) -> None:
    """Appends decided on the spot share one job until a group takes it or another job is
    queued after it (the writes stay in the order they were decided); the group's size
    counts requests, not jobs."""
    store = RecordingStore(tmp_path)
    committer = Committer(store, lambda jobs: None)
    entry = Entry("s")
    first = shared_write(committer, entry, 1, b"a")
    assert shared_write(committer, entry, 1, b"b") is first
    assert entry.inflight == 2 and entry.pending is not None and entry.pending.tail == 2
    between = committer.submit(job_for(entry, 1, b"c"))
    after = shared_write(committer, entry, 1, b"d")
    assert after is not first and after is not between
    assert sum(committer.batch_sizes.counts) == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        with trio.fail_after(60):
            await after.wait()
        assert first.done is between.done is after.done  # one group
        # The group took the shared job: the next append opens another.
        last = shared_write(committer, entry, 1, b"e")
        assert last is not after
        with trio.fail_after(60):
            await last.wait()
        nursery.cancel_scope.cancel()
    assert sum(committer.batch_sizes.counts) == 2 and committer.batch_sizes.sum == 5
    assert entry.inflight == 0
    reopened = Store(tmp_path)
    assert [r.data for r in reopened.read_records(1, 0, 1024)] == [b"a", b"b", b"c", b"d", b"e"]
    reopened.close()
    store.close()


async def test_answers_to_parked_readers_leave_before_the_rest_of_the_commit(
    tmp_path: Path,
) -> None:
    """A commit that moves a stream with a parked reader sends that reader's answer (the
    frame its connection queued for the end of the batch) before it wakes the commit's
    writers and tidies up, not at the end of the batch: what the writers' wake-up and the
    bookkeeping after it cost would otherwise be added to every live read."""
    store = Store(tmp_path)
    sent: list[str] = []

    def after_commit(jobs: list[Job]) -> None:
        sent.append("after commit")

    committer = Committer(store, after_commit)
    entry = Entry("s")

    def parked() -> bool:  # what a parked poll's answer does: its frame waits for the flush
        batch_end.current().due.append(lambda: sent.append("answer written"))
        return False  # answered: off the entry

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        entry.park(parked)
        await run_jobs(committer, [job_for(entry, 1, b"moved")])
        nursery.cancel_scope.cancel()
    store.close()
    assert sent == ["answer written", "after commit"]
