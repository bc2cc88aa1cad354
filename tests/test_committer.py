"""Where the group committer runs a transaction: on the loop when the group is small and
commits are quick, in a worker thread when the group is large or after slow commits.

Real SQLite (`shard.store.Store` in a temporary directory); a slow disk is simulated by a
store whose commit sleeps after doing the real work. Whatever the placement, every write
is durable when its job is released: a second Store on the same file reads it back.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import trio

from shard import committer as committer_module
from shard.committer import Committer, Job
from shard.core.model import Record, StreamState
from shard.store import Batch, Store, StreamWrite
from shard.streams import Entry

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
