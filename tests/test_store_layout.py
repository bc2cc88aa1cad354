"""The store's record layout: appends go to a journal that is folded into the records table.

Real SQLite files throughout: reads that span the two tables, a database made with the
layout from before the journal, the committer folding when the journal is due and when
writes pause, and a process SIGKILLed while it folds (nothing acknowledged is lost,
nothing appears twice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_cluster.shard import committer as committer_module
from ds_cluster.shard import store as store_module
from ds_cluster.shard.committer import Committer, Job
from ds_cluster.shard.core.model import (
    ForkOrigin,
    ProducerState,
    Record,
    StreamState,
    advance,
    evolve,
)
from ds_cluster.shard.store import Batch, Store, StreamWrite, decode_state, encode_state
from ds_cluster.shard.streams import Entry


def state(path: str, tail: int, producers: dict[str, ProducerState] | None = None) -> StreamState:
    return StreamState(
        path=path,
        content_type="application/octet-stream",
        created_at=1.0,
        tail=tail,
        producers=producers or {},
    )


class Writer:
    """Appends to streams of one store directly (no committer), keeping what it wrote."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.written: dict[int, list[Record]] = {}

    def append(self, *appends: tuple[int, bytes]) -> None:
        batch = Batch()
        for sid, data in appends:
            records = self.written.setdefault(sid, [])
            tail = records[-1].end if records else 0
            record = Record(tail, tail + len(data), data)
            records.append(record)
            batch.streams.append(
                StreamWrite(f"s{sid}", sid, sid, state(f"s{sid}", record.end), (record,))
            )
        self.store.commit(batch)

    def expected(
        self, sid: int, position: int, max_bytes: int, below: int | None = None
    ) -> list[Record]:
        out: list[Record] = []
        total = 0
        for record in self.written.get(sid, []):
            if record.end <= position:
                continue
            if below is not None and record.start >= below:
                break
            out.append(record)
            total += len(record.data)
            if total >= max_bytes:
                break
        return out


def test_reads_span_the_records_table_and_the_journal(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = Writer(store)
    for i in range(40):  # two streams, interleaved, folded half way
        writer.append((1, b"a%02d" % i), (2, b"bb%02d" % i))
        if i == 19:
            store.fold()
            assert store.journal_rows == 0
    assert store.journal_rows == 40
    # A large write to a stream with journal rows stays in the journal (after them)...
    big = b"L" * store_module.DIRECT_WRITE_BYTES
    writer.append((1, big), (1, b"after-big"))
    assert store.journal_rows == 42
    # ...and one to a stream with none goes straight to the records table.
    writer.append((3, big), (3, b"tail"))
    assert store.journal_rows == 43
    writer.append((3, b"more"))
    assert store.journal_rows == 44

    for sid in (1, 2, 3):
        ends = [0] + [r.end for r in writer.written[sid]]
        for position in ends + [ends[len(ends) // 2] + 1]:
            for max_bytes in (1, 7, 60, 1 << 20):
                got = store.read_records(sid, position, max_bytes)
                assert got == writer.expected(sid, position, max_bytes), (sid, position, max_bytes)
        middle = ends[len(ends) // 2]
        assert store.read_records(sid, 0, 1 << 20, below=middle) == writer.expected(
            sid, 0, 1 << 20, below=middle
        )
    assert store.read_records(9, 0, 1 << 20) == []
    store.fold()
    for sid in (1, 2, 3):
        assert store.read_records(sid, 0, 1 << 30) == writer.written[sid]
    store.close()

    reopened = Store(tmp_path)
    for sid in (1, 2, 3):
        assert reopened.read_records(sid, 0, 1 << 30) == writer.written[sid]
    reopened.close()


@pytest.mark.parametrize("count", [1, 63, 64, 65, 150])
def test_a_groups_journal_rows_are_written_in_order_whatever_their_number(
    tmp_path: Path, count: int
) -> None:
    """A group's journal rows go in INSERTs of up to JOURNAL_INSERT_ROWS rows each: all of
    them, in commit order (a stream's tail is its last row), counted once."""
    store = Store(tmp_path)
    writer = Writer(store)
    writer.append((9, b"before"))
    appends = [(1 + n % 3, b"r%03d" % n) for n in range(count)]
    writer.append(*appends)
    assert store.journal_rows == 1 + count
    assert store.journal_bytes == len(b"before") + sum(len(data) for _, data in appends)
    rows = store._require_writer().execute("SELECT sid, end_pos, start_pos, data FROM journal")
    expected = [(9, 6, 0, b"before")]
    expected += [(sid, r.end, r.start, r.data) for sid, r in _in_order(writer, appends)]
    assert list(rows) == expected
    for sid in {sid for sid, _ in appends} | {9}:
        assert store.journal_tails[sid] == writer.written[sid][-1].end
        assert store.read_records(sid, 0, 1 << 20) == writer.written[sid]
    store.close()


def _in_order(writer: Writer, appends: list[tuple[int, bytes]]) -> list[tuple[int, Record]]:
    """The records `appends` made, in the order they were appended."""
    taken: dict[int, int] = {}
    out = []
    for sid, _data in appends:
        records = writer.written[sid]
        index = taken.get(sid, len(records) - sum(1 for s, _ in appends if s == sid))
        taken[sid] = index + 1
        out.append((sid, records[index]))
    return out


def check_read(
    store: Store, writer: Writer, sid: int, position: int, max_bytes: int, below: int | None = None
) -> None:
    """The three read forms give what a record-by-record read gives."""
    expected = writer.expected(sid, position, max_bytes, below)
    where = (sid, position, max_bytes, below)
    assert store.read_records(sid, position, max_bytes, below=below) == expected, where
    start, end, datas = store.read_buffers(sid, position, max_bytes, below=below)
    if not expected:
        assert (start, end, datas) == (position, position, []), where
        assert store.read_joined(sid, position, max_bytes, below=below) is None, where
        return
    assert (start, end) == (expected[0].start, expected[-1].end), where
    assert datas == [r.data for r in expected], where
    joined = store.read_joined(sid, position, max_bytes, below=below)
    assert joined == Record(start, end, b"".join(datas)), where


def test_large_reads_in_batches_across_both_tables(tmp_path: Path) -> None:
    """Reads of thousands of records (several fetch batches) cut exactly where a record
    by record read would, by size and by `below`, in the records table, the journal and
    across them."""
    store = Store(tmp_path)
    writer = Writer(store)
    rows = store_module.READ_FIRST_ROWS + 2 * store_module.READ_BATCH_ROWS + 5
    for i in range(rows):
        writer.append((1, b"%d" % i * (1 + i % 7)), (2, b"x" * (1 + i % 3)))
        if i == rows // 2:
            store.fold()
    ends = [0] + [r.end for r in writer.written[1]]
    total = ends[-1]
    positions = [0, 1, ends[63], ends[64], ends[65], ends[rows // 2], ends[rows // 2 + 1] - 1]
    positions += [ends[1500], total - 1, total, total + 5]
    for position in positions:
        for max_bytes in (0, 1, 150, 151, 4096, 20_000, 1 << 30):
            check_read(store, writer, 1, position, max_bytes)
        for below in (1, ends[64], ends[64] + 1, ends[rows // 2 + 3], total, total + 9):
            check_read(store, writer, 1, position, 1 << 30, below)
            check_read(store, writer, 1, position, 3000, below)
    check_read(store, writer, 2, 0, 1 << 30)
    check_read(store, writer, 9, 0, 1 << 30)
    store.fold()
    check_read(store, writer, 1, 0, 1 << 30)
    check_read(store, writer, 1, ends[700], 10_000, ends[900])
    store.close()


def test_a_fold_sorts_the_journal_without_a_temporary_file(tmp_path: Path) -> None:
    """A fold's sort of a journal larger than SQLite's in-memory sort limit (about 2 MB
    with the default cache) stays in memory: no temporary file is open at any point of
    it (SQLite names them `etilqs_*`), and the rows arrive folded and in order."""
    store = Store(tmp_path)
    writer = Writer(store)
    for i in range(80):
        writer.append(*[(sid, bytes([65 + sid]) * 4000 + b"%d" % i) for sid in range(1, 9)])
    assert store.journal_bytes > 2_500_000
    temporary: set[str] = set()

    def look() -> int:
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if "etilqs_" in target:
                    temporary.add(target)
        return 0  # (go on)

    conn = store._writer
    assert conn is not None
    conn.set_progress_handler(look, 2000)
    try:
        store.fold()
    finally:
        conn.set_progress_handler(None, 0)
    assert temporary == set()
    assert store.journal_rows == 0
    for sid in range(1, 9):
        check_read(store, writer, sid, 0, 1 << 30)
    store.close()


def test_a_purged_stream_leaves_nothing_in_either_table(tmp_path: Path) -> None:
    store = Store(tmp_path)
    writer = Writer(store)
    for i in range(10):
        writer.append((1, b"x%d" % i), (2, b"y%d" % i))
        if i == 4:
            store.fold()
    store.commit(Batch(streams=[StreamWrite("s1", 1, 1, None)]))
    assert store.read_records(1, 0, 1 << 20) == []
    assert store.count_records(1, 100) == 0
    store.fold()
    assert store.read_records(1, 0, 1 << 20) == []
    assert store.read_records(2, 0, 1 << 20) == writer.written[2]
    store.close()


def test_a_batch_that_appends_to_a_stream_and_then_purges_it_leaves_no_rows(
    tmp_path: Path,
) -> None:
    """Appends are written together after a batch's streams, but a purge in the same batch
    comes after the rows it purges."""
    store = Store(tmp_path)
    writer = Writer(store)
    writer.append((1, b"first"), (2, b"other"))
    record = Record(5, 11, b"second")
    store.commit(
        Batch(
            streams=[
                StreamWrite("s1", 1, 1, state("s1", 11), (record,)),
                StreamWrite("s2", 2, 2, state("s2", 9), (Record(5, 9, b"more"),)),
                StreamWrite("s1", 1, 1, None),
            ]
        )
    )
    assert store.load_stream("s1") is None
    assert store.count_records(1, 100) == 0
    store.fold()
    assert store.count_records(1, 100) == 0
    loaded = store.load_stream("s2")
    assert loaded is not None and loaded[1].tail == 9
    assert store.read_records(2, 0, 1 << 20) == [Record(0, 5, b"other"), Record(5, 9, b"more")]
    store.close()


def test_a_stream_appended_twice_in_one_batch_keeps_its_last_state(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.commit(Batch(streams=[StreamWrite("s1", 1, None, state("s1", 0))]))
    first, second = Record(0, 1, b"a"), Record(1, 3, b"bc")
    store.commit(
        Batch(
            streams=[
                StreamWrite("s1", 1, 1, state("s1", 1, {"p": ProducerState(0, 0)}), (first,)),
                StreamWrite(
                    "s1",
                    1,
                    1,
                    state("s1", 3, {"p": ProducerState(0, 1)}),
                    (second,),
                    previous_producers={"p": ProducerState(0, 0)},
                ),
            ]
        )
    )
    store.close()
    reopened = Store(tmp_path)
    loaded = reopened.load_stream("s1")
    assert loaded is not None
    assert (loaded[0], loaded[1].tail, loaded[1].producers) == (1, 3, {"p": ProducerState(0, 1)})
    assert reopened.read_records(1, 0, 1 << 20) == [first, second]
    reopened.close()


def test_an_append_to_a_stream_with_a_ttl_moves_its_stored_deadline(tmp_path: Path) -> None:
    """Appends to a stream without a TTL write only its state; one with a TTL its deadline
    too (the alarms are armed from it after a restart)."""
    store = Store(tmp_path)
    timed = StreamState(path="t", content_type="text/plain", created_at=1.0, tail=0, ttl=60)
    plain = state("p", 0)
    store.commit(
        Batch(streams=[StreamWrite("t", 1, None, timed), StreamWrite("p", 2, None, plain)])
    )
    assert dict(store.load_deadlines()) == {"t": 60.0}
    later = StreamState(
        path="t", content_type="text/plain", created_at=1.0, tail=1, ttl=60, last_access=30.0
    )
    store.commit(
        Batch(
            streams=[
                StreamWrite("t", 1, 1, later, (Record(0, 1, b"a"),)),
                StreamWrite("p", 2, 2, state("p", 1), (Record(0, 1, b"b"),)),
            ]
        )
    )
    assert dict(store.load_deadlines()) == {"t": 90.0}
    loaded = store.load_stream("p")
    assert loaded is not None and loaded[1].tail == 1
    store.close()


def test_an_append_to_a_stream_without_its_row_still_writes_the_row(tmp_path: Path) -> None:
    """Appends update their stream's row; one that is missing is written all the same."""
    store = Store(tmp_path)
    store.commit(Batch(streams=[StreamWrite("s1", 1, 1, state("s1", 2), (Record(0, 2, b"ab"),))]))
    loaded = store.load_stream("s1")
    assert loaded is not None and (loaded[0], loaded[1].tail) == (1, 2)
    store.close()


# The tables a database had before the journal, as that store created them.
OLD_LAYOUT = """
CREATE TABLE streams (
    path TEXT PRIMARY KEY,
    sid INTEGER NOT NULL UNIQUE,
    deadline REAL,
    fork_ref TEXT,
    state BLOB NOT NULL
);
CREATE INDEX streams_deadline ON streams(deadline) WHERE deadline IS NOT NULL;
CREATE INDEX streams_fork_ref ON streams(fork_ref) WHERE fork_ref IS NOT NULL;
CREATE TABLE records (
    sid INTEGER NOT NULL,
    end_pos INTEGER NOT NULL,
    start_pos INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sid, end_pos)
) WITHOUT ROWID;
CREATE TABLE producers (
    sid INTEGER NOT NULL,
    producer TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (sid, producer)
) WITHOUT ROWID;
"""


def test_a_database_of_the_layout_before_the_journal_opens_with_everything(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "shard.db")
    db.execute("PRAGMA auto_vacuum=2")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(OLD_LAYOUT)
    old = [Record(i * 5, i * 5 + 5, b"old%02d" % i) for i in range(30)]
    with db:
        db.execute(
            "INSERT INTO streams (path, sid, state) VALUES (?, ?, ?)",
            ("old", 7, encode_state(state("old", old[-1].end))),
        )
        db.executemany(
            "INSERT INTO records (sid, end_pos, start_pos, data) VALUES (?, ?, ?, ?)",
            [(7, r.end, r.start, r.data) for r in old],
        )
        db.execute("INSERT INTO producers (sid, producer, epoch, seq) VALUES (7, 'p', 2, 29)")
    db.close()

    store = Store(tmp_path)
    assert store.failure is None
    loaded = store.load_stream("old")
    assert loaded is not None
    sid, loaded_state = loaded
    assert (sid, loaded_state.tail) == (7, 150)
    assert loaded_state.producers == {"p": ProducerState(2, 29)}
    assert store.read_records(7, 0, 1 << 20) == old
    assert store.journal_rows == 0
    # New appends land after the old records, across a fold and a reopen.
    new = Record(150, 153, b"new")
    producers = {"p": ProducerState(2, 30)}
    store.commit(
        Batch(
            streams=[
                StreamWrite(
                    "old",
                    7,
                    7,
                    state("old", 153, producers),
                    (new,),
                    previous_producers=loaded_state.producers,
                )
            ]
        )
    )
    assert store.read_records(7, 140, 1 << 20) == [old[-2], old[-1], new]
    store.close()
    reopened = Store(tmp_path)
    assert reopened.journal_rows == 1
    assert reopened.read_records(7, 0, 1 << 20) == old + [new]
    reopened.fold()
    assert reopened.read_records(7, 0, 1 << 20) == old + [new]
    loaded = reopened.load_stream("old")
    assert loaded is not None and loaded[1].producers == producers
    reopened.close()


def job_for(entry: Entry, sid: int, data: bytes) -> Job:
    tail = entry.pending.tail if entry.pending else 0
    write = StreamWrite(
        entry.path,
        sid,
        sid,
        state(entry.path, tail + len(data)),
        (Record(tail, tail + len(data), data),),
    )
    return Job(writes=[(entry, write)])


async def test_the_committer_folds_when_due_and_when_writes_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FOLD_ROWS", 50)
    monkeypatch.setattr(committer_module, "FOLD_IDLE_SECONDS", 0.2)
    store = Store(tmp_path)
    committer = Committer(store, lambda jobs: None)
    entries = [Entry(f"s{n}") for n in range(4)]
    expected: dict[int, bytes] = {n: b"" for n in range(4)}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        seen_fold = False
        for i in range(30):
            jobs = [job_for(entry, n + 1, b"%d:%d;" % (n, i)) for n, entry in enumerate(entries)]
            for n, job in enumerate(jobs):
                committer.submit(job)
                expected[n] += b"%d:%d;" % (n, i)
            for job in jobs:
                await job.wait()
            assert store.journal_rows < 50 + 4  # folded once due, right after the commit
            seen_fold = seen_fold or store.journal_rows < (i + 1) * 4
        assert seen_fold
        assert store.journal_rows > 0
        with trio.fail_after(10):
            while store.journal_rows:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    for n in range(4):
        assert b"".join(r.data for r in store.read_records(n + 1, 0, 1 << 20)) == expected[n]
    store.close()


CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ds_cluster.shard import store as store_module
    from ds_cluster.shard.core.model import Record, StreamState
    from ds_cluster.shard.store import Batch, Store, StreamWrite

    store_module.FOLD_ROWS = int(sys.argv[2])
    store = Store(Path(sys.argv[1]))
    assert store.failure is None, store.failure
    tails = {}
    for sid in range(1, 33):
        records = store.read_records(sid, 0, 1 << 30)
        tails[sid] = records[-1].end if records else 0
    n = 0
    while True:
        batch = Batch()
        for sid in range(1, 33):
            data = b"%d:%08d;" % (sid, tails[sid])
            record = Record(tails[sid], tails[sid] + len(data), data)
            state = StreamState(
                path=f"s{sid}", content_type="application/octet-stream", created_at=1.0,
                tail=record.end,
            )
            batch.streams.append(StreamWrite(f"s{sid}", sid, sid, state, (record,)))
            tails[sid] = record.end
        store.commit(batch)
        print("acked", " ".join(str(tails[sid]) for sid in range(1, 33)), flush=True)
        if store.fold_due():
            print("folding", flush=True)
            store.fold()
            print("folded", flush=True)
    """
)


def check_streams(data_dir: Path, acked: list[int]) -> list[int]:
    """Every stream holds whole records from 0, at least up to what was acknowledged and
    at most one group beyond; return the tails found."""
    store = Store(data_dir)
    tails = []
    try:
        for sid in range(1, 33):
            records = store.read_records(sid, 0, 1 << 30)
            position = 0
            for record in records:
                assert record.start == position, (sid, record)
                assert record.data == b"%d:%08d;" % (sid, position)
                position = record.end
            assert acked[sid - 1] <= position
            if position > acked[sid - 1]:  # committed, killed before it said so
                assert len(records) and records[-1].start == acked[sid - 1]
            tails.append(position)
        # A fold after the crash completes (a row in both tables would fail it) and
        # changes nothing a reader sees.
        before = [store.read_records(sid, 0, 1 << 30) for sid in range(1, 33)]
        store.fold()
        assert [store.read_records(sid, 0, 1 << 30) for sid in range(1, 33)] == before
    finally:
        store.close()
    return tails


def test_a_process_killed_while_folding_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    acked = [0] * 32
    mid_fold = 0
    for round_ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASHING_WRITER, str(data_dir), "6000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        folds = 0
        state_ = ""
        try:
            for line in child.stdout:
                if line.startswith("acked"):
                    acked = [int(x) for x in line.split()[1:]]
                state_ = line.split()[0]
                if line.startswith("folding"):
                    folds += 1
                    if folds == 1 + round_ % 2:
                        os.kill(child.pid, signal.SIGKILL)
                        break
            else:
                raise AssertionError(child.stderr.read() if child.stderr else "child ended")
        finally:
            child.kill()
            child.wait(30)
        rest = child.stdout.read().split()
        if state_ == "folding" and "folded" not in rest:
            mid_fold += 1
        tails = check_streams(data_dir, acked)
        acked = tails
    # The kill came right as the fold began: mostly it interrupted it.
    assert mid_fold >= 1


def test_state_encoding_is_the_same_on_every_thread() -> None:
    """encode_state packs with a Packer per thread (the committer encodes on the loop and
    in its worker thread): the bytes are the same on both, and decode back to the state."""
    full = StreamState(
        path="s1",
        content_type="application/json",
        created_at=1.5,
        tail=42,
        closed=True,
        ttl=60,
        last_access=2.5,
        last_stream_seq="b",
        closed_by=("p", 1, 7),
        fork=ForkOrigin("src", "0000000000000000_0000000000000003", 0, 3, "ref1", True),
        refcount=2,
    )
    here = [encode_state(s) for s in (full, state("s2", 9))]
    there: list[bytes] = []
    worker = threading.Thread(
        target=lambda: there.extend(encode_state(s) for s in (full, state("s2", 9)))
    )
    worker.start()
    worker.join()
    assert there == here
    assert decode_state("s1", here[0], {}) == full


def _stored_tail(store: Store, path: str) -> int:
    """The tail in the stream's row itself, as written (no journal correction)."""
    conn = sqlite3.connect(store.path)
    try:
        (blob,) = conn.execute("SELECT state FROM streams WHERE path = ?", (path,)).fetchone()
    finally:
        conn.close()
    return decode_state(path, blob, {}).tail


class Appender:
    """Appends to one stream as the service stages them: each write names the state it
    follows (`StreamWrite.previous`), so appends that move only the tail leave the row."""

    def __init__(self, store: Store, path: str, sid: int, current: StreamState) -> None:
        self.store, self.path, self.sid, self.current = store, path, sid, current
        store.commit(Batch(streams=[StreamWrite(path, sid, None, current)]))

    def write(self, data: bytes, **changes: object) -> StreamWrite:
        tail = self.current.tail
        new = evolve(self.current, tail=tail + len(data), last_access=tail + 1.0, **changes)
        write = StreamWrite(
            self.path,
            self.sid,
            self.sid,
            new,
            (Record(tail, tail + len(data), data),),
            self.current.producers,
            self.current,
        )
        self.current = new
        return write

    def append(self, data: bytes, **changes: object) -> None:
        self.store.commit(Batch(streams=[self.write(data, **changes)]))


def test_an_append_that_moves_only_the_tail_leaves_the_row_and_the_journal_tells(
    tmp_path: Path,
) -> None:
    """The row lags until the fold; every reader of tails sees the true one meanwhile,
    after a reopen too (the journal's tails are rebuilt), and the fold writes it."""
    store = Store(tmp_path)
    s1 = Appender(store, "s1", 1, state("s1", 0))
    s1.append(b"abc")
    s1.append(b"de")
    assert _stored_tail(store, "s1") == 0
    loaded = store.load_stream("s1")
    assert loaded is not None and (loaded[0], loaded[1].tail) == (1, 5)
    assert loaded[1] == evolve(s1.current, last_access=0.0)  # all but the last access
    assert store.paths_after("", 10) == [("s1", 5)]
    store.close()

    reopened = Store(tmp_path)  # (as after a crash: the journal still holds the rows)
    assert reopened.journal_tails == {1: 5}
    loaded = reopened.load_stream("s1")
    assert loaded is not None and loaded[1].tail == 5
    reopened.fold()
    assert reopened.journal_tails == {}
    assert _stored_tail(reopened, "s1") == 5
    loaded = reopened.load_stream("s1")
    assert loaded is not None and loaded[1].tail == 5
    assert reopened.read_records(1, 0, 1 << 20) == [Record(0, 3, b"abc"), Record(3, 5, b"de")]
    reopened.close()


def test_an_append_that_changes_more_than_the_tail_writes_the_row(tmp_path: Path) -> None:
    """Closing, a Stream-Seq, a stream with a TTL: the row is written, with the tail."""
    store = Store(tmp_path)
    plain = Appender(store, "p", 1, state("p", 0))
    plain.append(b"a")
    plain.append(b"b", last_stream_seq="0001")
    assert _stored_tail(store, "p") == 2
    plain.append(b"c")
    plain.append(b"d", closed=True)
    assert _stored_tail(store, "p") == 4
    timed = Appender(
        store,
        "t",
        2,
        StreamState(path="t", content_type="text/plain", created_at=1.0, ttl=60),
    )
    timed.append(b"xyz")
    assert _stored_tail(store, "t") == 3
    assert dict(store.load_deadlines()) == {"t": 61.0}  # last access 1.0, TTL 60
    big = Appender(store, "b", 3, state("b", 0))
    big.append(b"x" * store_module.DIRECT_WRITE_BYTES)  # straight into `records`
    assert _stored_tail(store, "b") == store_module.DIRECT_WRITE_BYTES
    store.close()


def test_a_purged_stream_leaves_the_journal_tails(tmp_path: Path) -> None:
    """A delete, or a new incarnation under a new id, drops the old id's journal tail; a
    batch that fails changes nothing in memory."""
    store = Store(tmp_path)
    s1 = Appender(store, "s1", 1, state("s1", 0))
    s1.append(b"abc")
    assert store.journal_tails == {1: 3}
    store.commit(Batch(streams=[StreamWrite("s1", 1, 1, None)]))
    assert store.journal_tails == {}
    s2 = Appender(store, "s2", 2, state("s2", 0))
    s2.append(b"ab")
    store.commit(Batch(streams=[StreamWrite("s2", 3, 2, state("s2", 0))]))  # re-created
    assert store.journal_tails == {}
    s3 = Appender(store, "s3", 4, state("s3", 0))
    batch = Batch(streams=[s3.write(b"abc")])
    batch.statements.append(store_module.Statement("INSERT INTO no_such_table VALUES (1)"))
    with pytest.raises(sqlite3.OperationalError):
        store.commit(batch)
    assert store.journal_tails == {}
    loaded = store.load_stream("s3")
    assert loaded is not None and loaded[1].tail == 0
    store.close()


def test_the_stored_fields_besides_the_tail_are_all_compared() -> None:
    """A field added to StreamState must be compared too (or said to move with appends)."""
    names = {f.name for f in dataclasses.fields(StreamState)}
    moved_by_appends = {"path", "tail", "last_access", "producers"}
    probe = StreamState(path="p", content_type="c", created_at=1.0)
    assert store_module._only_tail_moved(probe, advance(probe, 10, 2.0))
    compared = set()
    for name in names - moved_by_appends:
        value = getattr(probe, name)
        other = evolve(probe, **{name: ("changed", value)})
        if not store_module._only_tail_moved(probe, other):
            compared.add(name)
    assert compared == names - moved_by_appends


_STORED = operator.attrgetter(
    "content_type",
    "created_at",
    "closed",
    "ttl",
    "expires_at",
    "expires_at_ts",
    "last_stream_seq",
    "closed_by",
    "fork",
    "soft_deleted",
    "refcount",
)
_FORK = ForkOrigin("src", "0000000000000000_0000000000000000", 0, 0, "ref-1")


@settings(max_examples=300, deadline=None)
@given(
    st.data(),
    st.sampled_from(
        ["content_type", "created_at", "closed", "ttl", "expires_at"]
        + ["expires_at_ts", "last_stream_seq", "closed_by", "fork"]
        + ["soft_deleted", "refcount", "tail", "last_access", "producers"]
    ),
)
def test_only_tail_moved_is_the_comparison_of_the_stored_fields(
    data: st.DataObject, changed: str
) -> None:
    """`_only_tail_moved` answers exactly as comparing the eleven stored fields did."""
    values = {
        "content_type": st.sampled_from(["text/plain", "application/json"]),
        "created_at": st.sampled_from([1.0, 2.5]),
        "closed": st.booleans(),
        "ttl": st.sampled_from([None, 60]),
        "expires_at": st.sampled_from([None, "2030-01-01T00:00:00Z"]),
        "expires_at_ts": st.sampled_from([None, 1.9e9]),
        "last_stream_seq": st.sampled_from([None, "a", "b"]),
        "closed_by": st.sampled_from([None, ("p", 0, 1)]),
        "fork": st.sampled_from([None, _FORK]),
        "soft_deleted": st.booleans(),
        "refcount": st.sampled_from([0, 1]),
        "tail": st.sampled_from([0, 7]),
        "last_access": st.sampled_from([0.0, 3.0]),
        "producers": st.sampled_from([{}, {"p": ProducerState(0, 1)}]),
    }
    fields = {name: data.draw(strategy) for name, strategy in values.items()}
    previous = StreamState(path="p", **fields)  # type: ignore[arg-type]
    state = evolve(previous, **{changed: data.draw(values[changed])})
    if data.draw(st.booleans()):
        state = advance(state, state.tail + 3, 4.0)
    expected = (
        state.ttl is None
        and state.expires_at_ts is None
        and state.fork is None
        and _STORED(previous) == _STORED(state)
    )
    assert store_module._only_tail_moved(previous, state) == expected
    assert not store_module._only_tail_moved(None, state)


def test_advancing_writes_store_what_copied_appends_store(tmp_path: Path) -> None:
    """A plain append that does not copy its state (`store.append_write` with `accessed`, its stream
    in the journal already or not) commits what the same append with its state copied
    (`append_write`) commits: the same journal rows and tails, the row left to lag, and
    the same state once folded."""
    stores = [Store(tmp_path / "copied"), Store(tmp_path / "advancing")]
    base = state("s1", 0)
    for store in stores:
        store.commit(Batch(streams=[StreamWrite("s1", 1, None, base)]))
    tail = 0
    for round_ in range(3):
        records = []
        for size in (3, 5):
            records.append(Record(tail, tail + size, b"x" * size))
            tail += size
        now = 10.0 + round_
        copied, moving = Batch(), Batch()
        previous = advance(base, records[0].start, now)
        for record in records:
            new = advance(base, record.end, now)
            copied.streams.append(store_module.append_write("s1", 1, new, record, previous, True))
            moving.streams.append(store_module.append_write("s1", 1, base, record, base, True, now))
            previous = new
        stores[0].commit(copied)
        stores[1].commit(moving)
        assert stores[0].journal_tails == stores[1].journal_tails == {1: tail}
        assert _stored_tail(stores[1], "s1") == 0
    for store in stores:
        store.fold()
    loaded = [store.load_stream("s1") for store in stores]
    assert loaded[0] == loaded[1] and loaded[0] is not None and loaded[0][1].tail == tail
    read = [store.read_records(1, 0, 1 << 20) for store in stores]
    assert read[0] == read[1] and read[0][-1].end == tail
    for store in stores:
        store.close()


def test_an_advancing_write_to_records_stores_its_advanced_state(tmp_path: Path) -> None:
    """A plain append that does not copy its state (`store.append_write` with `accessed`)
    and is large enough to go to `records` rather than the journal: no journal row gives
    its tail, so its stream's row holds the advanced state, and a reopened store reads
    the stream to its end."""
    path = tmp_path / "db"
    store = Store(path)
    base = state("s1", 0)
    store.commit(Batch(streams=[StreamWrite("s1", 1, None, base)]))
    size = store_module.DIRECT_WRITE_BYTES
    data = os.urandom(size)
    record = Record(0, size, data)
    store.commit(Batch(streams=[store_module.append_write("s1", 1, base, record, base, True, 7.0)]))
    assert store.journal_tails == {}
    assert _stored_tail(store, "s1") == size
    store.close()
    reopened = Store(path)
    loaded = reopened.load_stream("s1")
    assert loaded is not None and loaded[1].tail == size and loaded[1].last_access == 7.0
    assert b"".join(r.data for r in reopened.read_records(1, 0, 1 << 20)) == data
    reopened.close()
