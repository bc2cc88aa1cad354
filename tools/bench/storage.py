"""Storage layouts of the shard's records, measured against each other.

    python -m ds_cluster.tools.bench.storage [--streams 256] [--size 100] [--groups 8,16,64]

Each candidate layout gets its own SQLite file with the shard's settings (WAL,
`synchronous=FULL`, the `unix-excl` VFS, no mmap), is filled with some history, and then
commits groups of appends of `--size` bytes, each group spread over distinct streams out of
`--streams` (what a loaded shard commits: one append per waiting connection). Printed per
layout and group size: process CPU (user + system, fsync included) per appended row, and
wall time per commit. Then the cost of reading 1 MiB of one stream from its start and from
its middle, for 100-byte records and for 64 KiB records (what the catch-up benchmark writes).

The candidates:

- `clustered`: the store's layout before the journal: records clustered by (sid, end_pos)
  `WITHOUT ROWID`; a commit dirties about one leaf page per distinct stream.
- `rowid+index`: records in a rowid table (appends land on its rightmost page) with an index
  on (sid, end_pos) for reads by offset; the index still has one leaf per stream.
- `journal+fold`: the clustered table fed through an append-only journal (a heap without
  index); every `--compact-rows` rows the whole journal moves into the clustered table in one
  transaction, sorted, so a stream's leaf page is written once per fold rather than once
  per commit. Reads take the clustered part and then scan the small journal.
- `heap+segments`: an append-only heap without any index, whose rows are moved into
  clustered per-stream segments (one row holding many records) every `--compact-rows`
  rows; the compaction's cost is counted into the rows. Reads of the heap part need an
  in-memory locator (not counted here).

Each layout is measured as the store writes today, with the stream's state blob rewritten
in `streams` at every append (`+state`), and without it (`bare`: the state would be carried by
the appended row and replayed at open), to show what that rewrite costs.

The store uses `journal+fold` (see `shard/store.py`). With `--committer inline|thread` the
tool instead drives the shard's own group committer and store with `--connections`
writers, each waiting for its commit like a connection of the append benchmark:

    python -m ds_cluster.tools.bench.storage --committer inline --seconds 3

With `--commit-latency RATE` it measures what a lone append waits for at a low rate (a
fan-out benchmark's writer): RATE commits a second for `--seconds`, each one 100-byte row
in a table of its own with the store's settings, alternated with a bare `fdatasync` of a
4 KiB overwrite in the same directory; printed: the percentiles of both, wall time and the
thread's CPU time (its system calls included). The difference between a durable server and
one in memory starts there.

With `--store-reads` it measures the store's read forms instead: `read_records` (a Record
per row), `read_buffers` (the datas as a list) and `read_joined` (one joined record).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from ds_cluster.shard.store import FOLD_ROWS, JOURNAL_SIZE_LIMIT, VFS
from ds_cluster.tools.bench.stats import percentile

MiB = 1024 * 1024
STATE_BLOB = bytes(120)  # about the size of an encoded StreamState


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the store's settings."""
    conn = sqlite3.connect(f"file:{quote(str(path))}?vfs={VFS}", uri=True, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum=2")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    conn.execute("PRAGMA mmap_size=0")
    return conn


STREAMS_SCHEMA = """
CREATE TABLE streams (path TEXT PRIMARY KEY, sid INTEGER NOT NULL UNIQUE, deadline REAL,
    fork_ref TEXT, state BLOB NOT NULL);
"""


class Layout:
    """One way of storing records: its schema, its append, its read by offset."""

    name = ""
    schema = ""

    def __init__(self, conn: sqlite3.Connection, with_state: bool) -> None:
        self.conn = conn
        self.with_state = with_state
        conn.executescript(STREAMS_SCHEMA + self.schema)

    def commit(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        """One transaction appending `rows` of (sid, start, end, data)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        self.insert(rows)
        if self.with_state:
            conn.executemany(
                "UPDATE streams SET state = ?, deadline = ? WHERE path = ?",
                [(STATE_BLOB, None, f"s{sid}") for sid, _s, _e, _d in rows],
            )
        conn.execute("COMMIT")
        self.after_commit(rows)

    def insert(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        raise NotImplementedError

    def after_commit(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        """Background work the layout needs (compaction), counted into the rows."""

    def read(self, sid: int, position: int, max_bytes: int) -> bytes:
        """Bytes of records with end > position, until max_bytes are gathered."""
        raise NotImplementedError


class Clustered(Layout):
    name = "clustered"
    schema = """CREATE TABLE records (sid INTEGER NOT NULL, end_pos INTEGER NOT NULL,
        start_pos INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (sid, end_pos))
        WITHOUT ROWID;"""

    def insert(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        self.conn.executemany(
            "INSERT INTO records (sid, start_pos, end_pos, data) VALUES (?, ?, ?, ?)", rows
        )

    def read(self, sid: int, position: int, max_bytes: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        cursor = self.conn.execute(
            "SELECT data FROM records WHERE sid = ? AND end_pos > ? ORDER BY end_pos",
            (sid, position),
        )
        while total < max_bytes:
            chunk = cursor.fetchmany(256)
            if not chunk:
                break
            for (data,) in chunk:
                parts.append(data)
                total += len(data)
        cursor.close()
        return b"".join(parts)


class RowidIndex(Clustered):
    name = "rowid+index"
    schema = """CREATE TABLE records (sid INTEGER NOT NULL, end_pos INTEGER NOT NULL,
        start_pos INTEGER NOT NULL, data BLOB NOT NULL);
        CREATE UNIQUE INDEX records_pos ON records (sid, end_pos);"""


class HeapSegments(Layout):
    name = "heap+segments"
    schema = """CREATE TABLE heap (sid INTEGER NOT NULL, start_pos INTEGER NOT NULL,
        end_pos INTEGER NOT NULL, data BLOB NOT NULL);
        CREATE TABLE segments (sid INTEGER NOT NULL, end_pos INTEGER NOT NULL,
        start_pos INTEGER NOT NULL, bounds BLOB NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (sid, end_pos)) WITHOUT ROWID;"""

    def __init__(self, conn: sqlite3.Connection, with_state: bool, compact_rows: int) -> None:
        super().__init__(conn, with_state)
        self.compact_rows = compact_rows
        self.heap_rows = 0

    def insert(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        self.conn.executemany(
            "INSERT INTO heap (sid, start_pos, end_pos, data) VALUES (?, ?, ?, ?)", rows
        )
        self.heap_rows += len(rows)

    def after_commit(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        if self.heap_rows >= self.compact_rows:
            self.compact()

    def compact(self) -> None:
        """Move the whole heap into one segment per stream, in one transaction."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        top = conn.execute("SELECT max(rowid) FROM heap").fetchone()[0]
        by_sid: dict[int, list[tuple[int, int, bytes]]] = {}
        for sid, start, end, data in conn.execute(
            "SELECT sid, start_pos, end_pos, data FROM heap WHERE rowid <= ?", (top,)
        ):
            by_sid.setdefault(sid, []).append((start, end, data))
        conn.executemany(
            "INSERT INTO segments (sid, end_pos, start_pos, bounds, data) VALUES (?, ?, ?, ?, ?)",
            [
                (
                    sid,
                    recs[-1][1],
                    recs[0][0],
                    b"".join(end.to_bytes(8, "little") for _s, end, _d in recs),
                    b"".join(d for _s, _e, d in recs),
                )
                for sid, recs in by_sid.items()
            ],
        )
        conn.execute("DELETE FROM heap WHERE rowid <= ?", (top,))
        conn.execute("COMMIT")
        self.heap_rows = 0

    def read(self, sid: int, position: int, max_bytes: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        cursor = self.conn.execute(
            "SELECT start_pos, data FROM segments WHERE sid = ? AND end_pos > ? ORDER BY end_pos",
            (sid, position),
        )
        for start, data in cursor:
            if start < position:
                data = data[position - start :]
            parts.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        cursor.close()
        return b"".join(parts)


class JournalFold(Clustered):
    """The clustered table fed through an append-only journal: appends go to a heap
    without an index; every `fold_rows` rows the whole journal moves into `records` in one
    transaction, sorted by (sid, end_pos), so a stream's leaf page is written once per fold
    instead of once per commit. Reads take `records` and then scan the (small) journal."""

    name = "journal+fold"
    schema = (
        Clustered.schema
        + """CREATE TABLE journal (sid INTEGER NOT NULL,
        end_pos INTEGER NOT NULL, start_pos INTEGER NOT NULL, data BLOB NOT NULL);"""
    )

    def __init__(self, conn: sqlite3.Connection, with_state: bool, fold_rows: int) -> None:
        super().__init__(conn, with_state)
        self.fold_rows = fold_rows
        self.journal_rows = 0

    def insert(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        self.conn.executemany(
            "INSERT INTO journal (sid, start_pos, end_pos, data) VALUES (?, ?, ?, ?)", rows
        )
        self.journal_rows += len(rows)

    def after_commit(self, rows: list[tuple[int, int, int, bytes]]) -> None:
        if self.journal_rows >= self.fold_rows:
            self.fold()

    def fold(self) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO records (sid, end_pos, start_pos, data) "
            "SELECT sid, end_pos, start_pos, data FROM journal ORDER BY sid, end_pos"
        )
        conn.execute("DELETE FROM journal")
        conn.execute("COMMIT")
        self.journal_rows = 0

    def scan_journal(self, sid: int) -> float:
        """ms to find one stream's rows in a journal of `fold_rows` rows."""
        t0 = time.perf_counter()
        self.conn.execute(
            "SELECT start_pos, end_pos, data FROM journal WHERE sid = ? AND end_pos > ? "
            "ORDER BY end_pos",
            (sid, 0),
        ).fetchall()
        return (time.perf_counter() - t0) * 1e3


def make_layouts(compact_rows: int) -> list[tuple[str, Callable[[sqlite3.Connection], Layout]]]:
    out: list[tuple[str, Callable[[sqlite3.Connection], Layout]]] = []
    for with_state in (True, False):
        suffix = "+state" if with_state else " bare"
        out += [
            (Clustered.name + suffix, functools.partial(Clustered, with_state=with_state)),
            (RowidIndex.name + suffix, functools.partial(RowidIndex, with_state=with_state)),
            (
                JournalFold.name + suffix,
                functools.partial(JournalFold, with_state=with_state, fold_rows=compact_rows),
            ),
            (
                HeapSegments.name + suffix,
                functools.partial(HeapSegments, with_state=with_state, compact_rows=compact_rows),
            ),
        ]
    return out


def measure_appends(
    layout: Layout, streams: int, size: int, group: int, rows: int, history: int
) -> tuple[float, float]:
    """(CPU µs per row, wall µs per commit) of committing `rows` rows in groups."""
    conn = layout.conn
    conn.executemany(
        "INSERT INTO streams (path, sid, state) VALUES (?, ?, ?)",
        [(f"s{sid}", sid, STATE_BLOB) for sid in range(streams)],
    )
    tails = [0] * streams
    rng = random.Random(7)
    data = os.urandom(size)

    def groups(count: int) -> list[list[tuple[int, int, int, bytes]]]:
        out = []
        for _ in range(count):
            picked = rng.sample(range(streams), min(group, streams))
            batch = []
            for sid in picked:
                batch.append((sid, tails[sid], tails[sid] + size, data))
                tails[sid] += size
            out.append(batch)
        return out

    for batch in groups(history // group):  # a history, so the B-trees have their depth
        layout.commit(batch)
    work = groups(max(1, rows // group))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for batch in work:
        layout.commit(batch)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    done = sum(len(b) for b in work)
    return cpu / done * 1e6, wall / len(work) * 1e6


def measure_reads(layout: Layout, record: int, repeat: int) -> tuple[float, float]:
    """(ms to read 1 MiB from the start, from the middle) of a 2 MiB stream of
    `record`-byte records, written among 7 other streams."""
    sid_base = 10_000 + record
    data = os.urandom(record)
    count = 2 * MiB // record
    rows = []
    for i in range(count):
        for k in range(8):
            rows.append((sid_base + k, i * record, (i + 1) * record, data))
            if len(rows) >= 512:
                layout.commit(rows)
                rows = []
    if rows:
        layout.commit(rows)
    if isinstance(layout, HeapSegments) and layout.heap_rows:
        layout.compact()
    if isinstance(layout, JournalFold):
        layout.fold()
    out = []
    for position in (0, MiB):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            got = layout.read(sid_base, position, MiB)
            best = min(best, time.perf_counter() - t0)
            assert len(got) >= MiB - record, (layout.name, len(got))
        out.append(best * 1e3)
    return out[0], out[1]


async def drive_committer(
    data_dir: Path, streams: int, size: int, connections: int, seconds: float, threaded: bool
) -> dict[str, float]:
    """The shard's real group committer and store under `connections` concurrent writers
    (each waits for its append's commit before the next, like a connection of the append
    benchmark), over `streams` streams: appends/s, CPU per append of the loop thread and of
    the whole process (worker threads' commits and folds included), appends per commit."""
    import trio

    from ds_cluster.shard import committer as committer_module
    from ds_cluster.shard.committer import Committer, Job
    from ds_cluster.shard.core.model import Record, StreamState, evolve
    from ds_cluster.shard.store import Batch, Store, StreamWrite
    from ds_cluster.shard.streams import Entry

    if threaded:
        committer_module.INLINE_BATCH_BYTES = -1  # every group in a worker thread
    store = Store(data_dir)
    committer = Committer(store, lambda jobs: None)
    entries = [Entry(f"s{n}") for n in range(streams)]
    for n, entry in enumerate(entries):
        entry.committed = entry.pending = StreamState(
            path=entry.path, content_type="application/octet-stream", created_at=1.0, tail=0
        )
        entry.committed_sid = entry.pending_sid = n + 1
    created = [StreamWrite(e.path, n + 1, None, e.committed) for n, e in enumerate(entries)]
    store.commit(Batch(streams=created))
    data = os.urandom(size)
    done = 0
    rng = random.Random(3)

    async def writer(until: float) -> None:
        nonlocal done
        while trio.current_time() < until:
            entry = entries[rng.randrange(streams)]
            pending = entry.pending
            assert pending is not None and entry.pending_sid is not None
            state = evolve(pending, tail=pending.tail + size)
            record = Record(pending.tail, state.tail, data)
            write = StreamWrite(entry.path, entry.pending_sid, entry.pending_sid, state, (record,))
            job = committer.submit(Job(writes=[(entry, write)]))
            await job.wait()
            done += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        async with trio.open_nursery() as writers:  # a warm-up second first
            for _ in range(connections):
                writers.start_soon(writer, trio.current_time() + 1.0)
        commits0 = sum(committer.batch_sizes.counts)
        done = 0
        cpu0, loop0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
        async with trio.open_nursery() as writers:
            for _ in range(connections):
                writers.start_soon(writer, trio.current_time() + seconds)
        cpu, loop = time.process_time() - cpu0, time.thread_time() - loop0
        wall = time.perf_counter() - wall0
        commits = sum(committer.batch_sizes.counts) - commits0
        nursery.cancel_scope.cancel()
    store.close()
    return {
        "appends/s": done / wall,
        "loop us/append": loop / done * 1e6,
        "all us/append": cpu / done * 1e6,
        "appends/commit": done / max(commits, 1),
    }


def measure_store_reads(data_dir: Path, record: int, folded: bool, repeat: int) -> list[float]:
    """The store's own reads of 1 MiB of one stream of `record`-byte records (2 MiB
    written, in the records table when `folded`, else in the journal): process CPU ms,
    best of `repeat`, from its start and its middle, for each read form."""
    from ds_cluster.shard.core.model import Record, StreamState, evolve
    from ds_cluster.shard.store import Batch, Store, StreamWrite

    store = Store(data_dir)
    state = StreamState(path="s", content_type="application/octet-stream", created_at=1.0, tail=0)
    data = os.urandom(record)
    pending: list[Record] = []
    for n in range(2 * MiB // record):
        pending.append(Record(state.tail, state.tail + record, data))
        state = evolve(state, tail=state.tail + record)
        if len(pending) == 64 or n == 2 * MiB // record - 1:
            write = StreamWrite("s", 1, 1 if n >= 64 else None, state, tuple(pending))
            store.commit(Batch(streams=[write]))
            pending = []
    if folded:
        store.fold()
    out = []
    for read in (store.read_records, store.read_buffers, store.read_joined):
        for position in (0, MiB // 2):
            best = math.inf
            for _ in range(repeat):
                t0 = time.process_time()
                read(1, position, MiB)
                best = min(best, time.process_time() - t0)
            out.append(best * 1e3)
    store.close()
    return out


def percentiles(samples: list[float]) -> str:
    """p50 / p90 / p99 / max of `samples` (milliseconds)."""
    ordered = sorted(samples)
    return " / ".join(f"{percentile(ordered, p):.3f}" for p in (50, 90, 99, 100))


def measure_commit_latency(directory: Path, rate: float, seconds: float) -> dict[str, str]:
    """Lone commits of one row, alternated with bare fdatasyncs, `rate` of each a second:
    wall time and the thread's CPU time (system calls included) of each."""
    conn = connect(directory / "lone.db")
    conn.execute("CREATE TABLE journal (sid INTEGER, end_pos INTEGER, data BLOB)")
    fd = os.open(directory / "sync.bin", os.O_RDWR | os.O_CREAT)
    found: dict[str, list[float]] = {
        "SQLite commit of one row": [],
        "  CPU of the commit": [],
        "bare fdatasync": [],
        "  CPU of the fdatasync": [],
    }
    commits, commit_cpu, syncs, sync_cpu = found.values()
    try:
        os.pwrite(fd, bytes(4096 * 256), 0)
        os.fsync(fd)
        row = bytes(100)
        for n in range(max(1, int(rate * seconds))):
            t0, c0 = time.perf_counter(), time.thread_time()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO journal VALUES (?, ?, ?)", (n % 50, n, row))
            conn.execute("COMMIT")
            t1, c1 = time.perf_counter(), time.thread_time()
            os.pwrite(fd, row * 40, (n % 256) * 4096)
            t2, c2 = time.perf_counter(), time.thread_time()
            os.fdatasync(fd)
            t3, c3 = time.perf_counter(), time.thread_time()
            commits.append((t1 - t0) * 1e3)
            commit_cpu.append((c1 - c0) * 1e3)
            syncs.append((t3 - t2) * 1e3)
            sync_cpu.append((c3 - c2) * 1e3)
            time.sleep(max(0.0, 1 / rate - (t3 - t0)))
    finally:
        os.close(fd)
        conn.close()
    return {name: percentiles(samples) for name, samples in found.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--size", type=int, default=100, help="bytes per append")
    parser.add_argument("--groups", default="8,16,64", help="appends per commit")
    parser.add_argument("--rows", type=int, default=12_000, help="measured rows per run")
    parser.add_argument("--history", type=int, default=50_000, help="rows written first")
    parser.add_argument(
        "--compact-rows",
        type=int,
        default=FOLD_ROWS,
        help="rows per fold or compaction (default: the store's FOLD_ROWS)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the files go")
    parser.add_argument(
        "--committer",
        choices=["inline", "thread"],
        help="instead: drive the shard's group committer and store with --connections "
        "writers for --seconds (inline: its default placement; thread: every group in a "
        "worker thread)",
    )
    parser.add_argument(
        "--store-reads",
        action="store_true",
        help="instead: the store's read forms (read_records, read_buffers, read_joined) of "
        "1 MiB, 100 B and 64 KiB records, folded and in the journal",
    )
    parser.add_argument(
        "--commit-latency",
        type=float,
        metavar="RATE",
        help="instead: lone one-row commits and bare fdatasyncs, RATE of each a second",
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.commit_latency:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            found = measure_commit_latency(Path(tmp), args.commit_latency, args.seconds)
        print(f"{args.commit_latency:g} a second for {args.seconds:g} s, ms p50 / p90 / p99 / max")
        for name, text in found.items():
            print(f"  {name:<26}{text}")
        return
    if args.committer:
        import trio

        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            result = trio.run(
                drive_committer,
                Path(tmp),
                args.streams,
                args.size,
                args.connections,
                args.seconds,
                args.committer == "thread",
            )
        print(
            f"committer ({args.committer}), {args.connections} writers, {args.streams} streams, "
            f"{args.size} B: " + ", ".join(f"{value:,.1f} {name}" for name, value in result.items())
        )
        return
    if args.store_reads:
        print("the store reading 1 MiB of one stream: process CPU ms, best of 7 (start / middle)")
        print(f"{'records':<18}{'read_records':>16}{'read_buffers':>16}{'read_joined':>16}")
        for record in (100, 64 * 1024):
            for folded in (True, False):
                with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                    ms = measure_store_reads(Path(tmp), record, folded, 7)
                where = "records" if folded else "journal"
                label = f"{record} B, {where}"
                text = "".join(
                    f"{a:>8.2f} /{b:>6.2f}" for a, b in zip(ms[::2], ms[1::2], strict=True)
                )
                print(f"{label:<18}{text}", flush=True)
        return
    groups = [int(g) for g in args.groups.split(",")]
    layouts = make_layouts(args.compact_rows)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(
            f"{args.streams} streams, {args.size} B appends, {args.rows} rows per cell after "
            f"{args.history} rows of history; WAL, synchronous=FULL, vfs={VFS}"
        )
        header = f"{'layout':<22}" + "".join(
            f"{'g=' + str(g) + ' cpu us/row':>18}{'ms/commit':>11}" for g in groups
        )
        print(header)
        for n, (name, make) in enumerate(layouts):
            cells = []
            for g in groups:
                path = Path(tmp) / f"l{n}-{g}.db"
                conn = connect(path)
                cpu, wall = measure_appends(
                    make(conn), args.streams, args.size, g, args.rows, args.history
                )
                conn.close()
                os.unlink(path)
                cells.append(f"{cpu:>18.1f}{wall / 1000:>11.2f}")
            print(f"{name:<22}" + "".join(cells), flush=True)
        path = Path(tmp) / "scan.db"
        conn = connect(path)
        journal = JournalFold(conn, False, 1 << 62)
        measure_appends(journal, args.streams, args.size, 64, 0, args.compact_rows - 64)
        scan = min(journal.scan_journal(sid) for sid in range(0, args.streams, 16))
        t0 = time.perf_counter()
        journal.fold()
        fold = (time.perf_counter() - t0) * 1e3
        conn.close()
        print(
            f"journal+fold, a full journal ({args.compact_rows} rows): one stream's rows found "
            f"in {scan:.2f} ms; the fold takes {fold:.1f} ms"
        )
        print()
        print("read 1 MiB of a stream (ms, best of 5), 100 B and 64 KiB records")
        print(f"{'layout':<22}{'100B start':>12}{'100B mid':>10}{'64K start':>11}{'64K mid':>10}")
        for n, (name, make) in enumerate(layouts):
            if not name.endswith("bare"):
                continue
            cells = []
            for record in (100, 64 * 1024):
                path = Path(tmp) / f"r{n}-{record}.db"
                conn = connect(path)
                start, mid = measure_reads(make(conn), record, 5)
                conn.close()
                os.unlink(path)
                cells.append(
                    f"{start:>12.2f}{mid:>10.2f}"
                    if record == 100
                    else f"{start:>11.2f}{mid:>10.2f}"
                )
            print(f"{name.split()[0]:<22}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
