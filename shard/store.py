"""The shard's SQLite store: stream states, their records, producers, fork bookkeeping.

One database per shard, in WAL mode with synchronous=FULL: a commit is on disk when it
returns, and the committer acknowledges writes only after that. Everything one batch
changes commits in a single transaction, so producer state, data, closure and fork
references are atomic with each other.

Two connections: the *reader* lives on the trio thread and only ever sees committed data
(WAL snapshot isolation); the *writer* is used by the group committer, on the loop for
small groups and from a worker thread for large or slow ones, while the reader keeps
serving. Both open the file through SQLite's `unix-excl` VFS, which is what lets us keep
two connections and still have no shared-memory file:

- The process takes an exclusive POSIX lock on the database for as long as it has it open,
  so another process (a second shard on the same directory, or any tool) cannot open it
  at all ("database is locked"). This backs up the shard's own `shard.lock` (see
  `shard.dirlock`).
- The WAL index lives in this process's heap, shared by its connections, instead of a
  memory-mapped `-shm` file. A mapped file is a process-killer: when its pages cannot be
  written (the files were made immutable), the kernel answers with SIGBUS. With no
  mapping (and `mmap_size=0`) every storage fault is an ordinary error that fails one
  commit.

The alternative, `PRAGMA locking_mode=EXCLUSIVE`, also drops the `-shm` file but allows
a single connection: reads would then have to wait out every worker-thread commit (they
must not see its uncommitted rows), stalling all readers behind one large append. With
`unix-excl`, a read during a 50 MB commit in the worker thread measured under 0.5 ms.

Storage faults: the store is either open (both connections, the database proven writable
by a probe write) or failed, with a reason that `health()` reports. Reads through a
failed but still open reader keep working where the disk allows; a store that could not
be opened at all answers every read with `StorageUnavailable`. Reopening (`connect`, then
`install`) is the committer's job, with a backoff.

Appends go to the `journal`, a heap without any index: a group commit then writes a page
or two of it however many streams the group spreads over, where inserting into `records`
(clustered by stream and position) dirties about one page per distinct stream - the
larger part of a commit's cost (measured with `tools/bench/storage.py`: about half the
CPU per row at 64 appends per commit). Once the journal holds FOLD_ROWS rows or FOLD_BYTES
bytes, `fold` moves all of it into `records` in one transaction, sorted, so each stream's
leaf page is written once per fold instead of once per commit. A stream's journal rows always
come after its rows in `records`, so a read takes `records` first and then the journal's
rows of that stream (a scan of a table kept small), both in one read transaction so that a
fold cannot move rows out of its sight. A fold is atomic like any commit: after a crash the
rows are in one table or the other, never in both or neither. A database written before the
journal existed opens as it is (its records are all folded).

A stream's stored state may lag its data between folds: an append that changes nothing
but the stream's tail (and its last access, which only a TTL reads; a stream with a TTL,
an expiry time or a fork origin always writes its state) adds its journal row and leaves
the `streams` row alone. Rewriting that row was the costliest statement of a commit: its
page is one of many (one per stream appended to), where the journal's rows share a page or
two. The true tail is the stored one or the last journal row's end, whichever is greater
(`journal_tails`, kept in memory, rebuilt from the journal when the database opens); a fold
brings every lagging row up to date in its own transaction, before the journal empties.

Space: new databases use `auto_vacuum=INCREMENTAL` (an existing one is converted by a
VACUUM at its first open), and the committer returns freed pages to the filesystem in
small `vacuum_step`s after commits that purged data.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack

from ds_cluster.shard import wal_file
from ds_cluster.shard.core.model import (
    ForkOrigin,
    ProducerState,
    Record,
    StreamState,
    advance,
    evolve,
)

log = logging.getLogger(__name__)

# The VFS that holds an exclusive lock on the database and keeps the WAL index in heap
# memory (no -shm file, no mmap); see the module docstring.
VFS = "unix-excl"
AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum value
# After a checkpoint the WAL is cut back to this size (it keeps its high-water mark
# otherwise: one 50 MB append would leave a 50 MB WAL file behind for good). A new WAL
# is made this long at once (see `shard.wal_file`).
JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024
# The `outbox` status of a subscription notice (shard/subscriptions/notices.py): a
# stream whose new tail the owners of matching subscriptions must still be told.
NOTICE_STATUS = "notify"
# The journal is folded into `records` once it holds this many rows or bytes: big enough
# that a stream's leaf page is rewritten once for many of its appends, small enough that a
# fold (about 2 µs per row) holds the next group commit back by only a few tens of ms and a
# read's scan of the journal stays a fraction of a millisecond.
FOLD_ROWS = 8192
FOLD_BYTES = 4 * 1024 * 1024
# A fold sorts the journal (`ORDER BY sid, end_pos`), and SQLite's sorter spilled it to a
# temporary file: about 700 writes a second per loaded shard. The writer keeps temporary
# data in memory instead (`temp_store=MEMORY`; a fold's sort holds at most FOLD_BYTES and
# its rows' keys): CPU per fold of 8,192 rows 19.3-22.6 -> 17.7-18.0 ms, in alternated
# runs of a loop of group commits with the store's settings (14 rows of 100 B each, over
# 128 streams), folding as the committer does.
# A write carrying at least this many record bytes goes straight into `records` when its
# stream has nothing in the journal: its pages are written once, not again by the fold.
DIRECT_WRITE_BYTES = 16 * 1024
# The reader's page cache (KiB; SQLite's default is 2 MiB). Catch-up reads of a few hot
# streams then come from memory instead of a pread per 4 KiB page: reading 1 MiB measured
# 0.17 ms of CPU instead of 0.35. The cache only grows as pages are read, and a commit
# (which changes the WAL) empties it, so under writes it costs little memory either way.
READ_CACHE_KIB = 32 * 1024
# Rows fetched by a read's first step (most reads are a live reader's few new records), and
# by each further step (a catch-up's megabyte of small records in a few steps).
READ_FIRST_ROWS = 64
READ_BATCH_ROWS = 1024
# Prepared statements a connection keeps: the journal's INSERTs of each row count
# (JOURNAL_INSERT_ROWS of them) besides every other statement (sqlite3's default is 128).
STATEMENT_CACHE = 256
_FIRST = operator.itemgetter(0)
_DATA = operator.itemgetter(-1)  # a read row's data: its last column
# A new stream's row, or a new incarnation's (a further write of a stored stream is an
# UPDATE: see `_PendingRows`).
_UPSERT_STREAM = (
    "INSERT INTO streams (path, sid, deadline, fork_ref, state) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(path) DO UPDATE SET sid = excluded.sid, deadline = excluded.deadline, "
    "fork_ref = excluded.fork_ref, state = excluded.state"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    path TEXT PRIMARY KEY,
    sid INTEGER NOT NULL UNIQUE,
    deadline REAL,
    fork_ref TEXT,
    state BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS streams_deadline ON streams(deadline) WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS streams_fork_ref ON streams(fork_ref) WHERE fork_ref IS NOT NULL;
CREATE TABLE IF NOT EXISTS records (
    sid INTEGER NOT NULL,
    end_pos INTEGER NOT NULL,
    start_pos INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sid, end_pos)
) WITHOUT ROWID;
-- appends since the last fold, in commit order: a heap without index, cheap to append to
-- (see `Store.fold`); a stream's rows here all come after its rows in `records`
CREATE TABLE IF NOT EXISTS journal (
    sid INTEGER NOT NULL,
    end_pos INTEGER NOT NULL,
    start_pos INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS producers (
    sid INTEGER NOT NULL,
    producer TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (sid, producer)
) WITHOUT ROWID;
-- references held on our streams by forks (possibly on other shards), keyed by ref id
CREATE TABLE IF NOT EXISTS fork_refs (
    ref TEXT PRIMARY KEY,
    path TEXT NOT NULL
);
-- one row, rewritten at each open: proves the database writable before the shard says ok
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    opened_at REAL NOT NULL
);
-- fork references *we* hold on other streams that must be released: 'provisional' while a
-- fork is being created (released on recovery unless the fork committed), 'due' once the
-- fork is gone. Delivered with retries until the source's shard acknowledges.
CREATE TABLE IF NOT EXISTS outbox (
    ref TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    status TEXT NOT NULL
);
-- the shard's own settings that must survive it: its newest ring, the shards that may
-- still hold streams it owns (see shard/handoff.py)
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- streams arriving from their old owner: records staged under `sid` up to `received`;
-- the stream's row in `streams` is written only when the whole of it has arrived
CREATE TABLE IF NOT EXISTS arrivals (
    path TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    version INTEGER NOT NULL,
    sid INTEGER NOT NULL UNIQUE,
    received INTEGER NOT NULL
);
-- streams this shard has sent whole to `target` and not yet deleted: after a crash it
-- asks that shard whether the stream arrived before it sends it anywhere else
CREATE TABLE IF NOT EXISTS departures (
    path TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    version INTEGER NOT NULL
);
-- the last completed arrival of each path: a sender that retries after a crash is told
-- the stream is already here (the import is idempotent)
CREATE TABLE IF NOT EXISTS arrived (
    path TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    version INTEGER NOT NULL
);
"""


class _Packers(threading.local):
    """This thread's msgpack Packer: `msgpack.packb` builds one per call, which cost more
    than packing the state itself (a commit encodes one state per appended stream, on the
    loop or in the committer's worker thread; a Packer is not thread-safe)."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _Packers()


def encode_state(state: StreamState) -> bytes:
    fork = state.fork
    packed: bytes = _packers.packer.pack(
        [
            1,  # layout version
            state.content_type,
            state.created_at,
            state.tail,
            state.closed,
            state.ttl,
            state.expires_at,
            state.expires_at_ts,
            state.last_access,
            state.last_stream_seq,
            list(state.closed_by) if state.closed_by else None,
            # a 6th item, `linked`, marks forks that read inherited data from the source;
            # 5-item origins (older forks) hold a copy of it and decode as not linked
            [fork.source, fork.offset, fork.sub_offset, fork.position, fork.ref, fork.linked]
            if fork
            else None,
            state.soft_deleted,
            state.refcount,
        ]
    )
    return packed


def decode_state(path: str, blob: bytes, producers: dict[str, ProducerState]) -> StreamState:
    (
        _layout,
        content_type,
        created_at,
        tail,
        closed,
        ttl,
        expires_at,
        expires_at_ts,
        last_access,
        last_stream_seq,
        closed_by,
        fork,
        soft_deleted,
        refcount,
    ) = msgpack.unpackb(blob, raw=False)
    return StreamState(
        path=path,
        content_type=content_type,
        created_at=created_at,
        tail=tail,
        closed=closed,
        ttl=ttl,
        expires_at=expires_at,
        expires_at_ts=expires_at_ts,
        last_access=last_access,
        last_stream_seq=last_stream_seq,
        closed_by=tuple(closed_by) if closed_by else None,
        producers=producers,
        fork=ForkOrigin(*fork) if fork else None,
        soft_deleted=soft_deleted,
        refcount=refcount,
    )


@dataclass(slots=True)
class StreamWrite:
    """One stream's change within a batch: the state to store (None = purge). With slots:
    every append makes one."""

    path: str
    sid: int
    old_sid: int | None  # the incarnation being replaced or purged, if any
    state: StreamState | None
    records: tuple[Record, ...] = ()
    previous_producers: Mapping[str, ProducerState] | None = None
    # The state this write follows in the same incarnation (None: not known, or a new
    # incarnation): when the two differ only in what an append moves, the stored row is
    # left to lag (see the module docstring).
    previous: StreamState | None = None
    # The caller vouches that `_only_tail_moved(previous, state)` holds (a plain append,
    # whose state the core advanced from `previous`): not compared again, field by field.
    tail_moved: bool = False
    # Set (the time of the append): the state written is `state` advanced to the end of
    # `records` at that last access (core.model.advance), not made for it (see
    # `shard.streams.Entry`); with `tail_moved`, its stored row lags as any plain append's.
    accessed: float | None = None

    def tail(self) -> int:
        """The stream's tail once this write is applied (its state not None)."""
        if self.accessed is not None:
            return self.records[-1].end
        assert self.state is not None
        return self.state.tail


_new = object.__new__


def append_write(
    path: str,
    sid: int,
    state: StreamState,
    record: Record,
    previous: StreamState,
    tail_moved: bool,
    accessed: float | None = None,
) -> StreamWrite:
    """`StreamWrite(path, sid, sid, state, (record,), previous.producers, previous,
    tail_moved)`: one record appended in the same incarnation, without the class call
    (Python 3.11 runs a class's `__init__` through a generic slot path: every append
    makes one, and its slots filled here cost about 550 instructions less).

    With `accessed` (the time of the append), the write of a plain append that leaves
    its stream's state as it is (`state` is `previous`, advanced to `record.start`): the
    state written is `advance(state, record.end, accessed)`, made by no one here. Only
    for a `state` without a fork origin or a `closed_by`, whose stored row may lag
    (`tail_moved`)."""
    write = _new(StreamWrite)
    write.path = path
    write.sid = sid
    write.old_sid = sid
    write.state = state
    write.records = (record,)
    write.previous_producers = previous.producers
    write.previous = previous
    write.tail_moved = tail_moved
    write.accessed = accessed
    return write


@dataclass(frozen=True)
class Statement:
    """One more statement for a batch's transaction (the moves' bookkeeping, settings):
    built by this module's functions below, so every SQL text lives here."""

    sql: str
    params: Sequence[object] | Sequence[Sequence[object]] = ()
    many: bool = False


def put_meta(key: str, value: bytes) -> Statement:
    return Statement("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def stage_arrival(path: str, source: str, version: int, sid: int) -> Statement:
    """Begin receiving `path` from `source`: its records will be staged under `sid`."""
    return Statement(
        "INSERT OR REPLACE INTO arrivals (path, source, version, sid, received) "
        "VALUES (?, ?, ?, ?, 0)",
        (path, source, version, sid),
    )


def stage_records(path: str, sid: int, records: Sequence[Record], received: int) -> list[Statement]:
    """An arriving stream's next records, and how far it has now arrived."""
    return [
        Statement(
            "INSERT OR REPLACE INTO records (sid, end_pos, start_pos, data) VALUES (?, ?, ?, ?)",
            [(sid, r.end, r.start, r.data) for r in records],
            many=True,
        ),
        Statement("UPDATE arrivals SET received = ? WHERE path = ?", (received, path)),
    ]


def finish_arrival(path: str, source: str, version: int) -> list[Statement]:
    """The stream has arrived whole (its row is written in the same transaction)."""
    return [
        Statement("DELETE FROM arrivals WHERE path = ?", (path,)),
        Statement(
            "INSERT OR REPLACE INTO arrived (path, source, version) VALUES (?, ?, ?)",
            (path, source, version),
        ),
    ]


def depart(path: str, target: str, version: int) -> Statement:
    """`path` is about to be committed by `target` (then deleted here: `departed`)."""
    return Statement(
        "INSERT OR REPLACE INTO departures (path, target, version) VALUES (?, ?, ?)",
        (path, target, version),
    )


def departed(path: str) -> Statement:
    return Statement("DELETE FROM departures WHERE path = ?", (path,))


def purge_slice(sid: int, records: int) -> Statement:
    """Delete the first `records` folded records of stream `sid` (a large purge, in steps;
    see `Store.count_records`)."""
    return Statement(
        "DELETE FROM records WHERE sid = ? AND end_pos IN "
        "(SELECT end_pos FROM records WHERE sid = ? ORDER BY end_pos LIMIT ?)",
        (sid, sid, records),
    )


def drop_arrival(path: str, sid: int) -> list[Statement]:
    """Discard a half-received stream (its sender starts it again)."""
    return [
        Statement("DELETE FROM records WHERE sid = ?", (sid,)),
        Statement("DELETE FROM arrivals WHERE path = ?", (path,)),
    ]


@dataclass(frozen=True)
class Arrival:
    """A stream being received (a row of `arrivals`)."""

    path: str
    source: str
    version: int
    sid: int
    received: int


@dataclass
class Batch:
    """Everything one transaction writes."""

    streams: list[StreamWrite] = field(default_factory=list)
    touches: list[tuple[str, StreamState]] = field(default_factory=list)
    refs_added: list[tuple[str, str]] = field(default_factory=list)  # (ref, path)
    refs_removed: list[str] = field(default_factory=list)
    outbox_put: list[tuple[str, str, str]] = field(default_factory=list)  # (ref, source, status)
    outbox_removed: list[str] = field(default_factory=list)
    statements: list[Statement] = field(default_factory=list)


@dataclass(frozen=True)
class Connections:
    """What `Store.connect` opened, for `Store.install`: both connections, and what the
    journal held at that moment."""

    writer: sqlite3.Connection
    reader: sqlite3.Connection
    journal_rows: int
    journal_bytes: int
    journal_tails: dict[int, int]  # stream id -> the end of its last journal row


class StorageUnavailable(Exception):
    """The shard's storage failed or is not open; a write that got this did not happen."""


def is_storage_error(exc: BaseException) -> bool:
    """Whether `exc` says the storage failed (disk full, I/O error, read-only, missing
    files), as opposed to a bug in the statements we sent."""
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return False
    return isinstance(exc, sqlite3.DatabaseError | OSError | StorageUnavailable)


class _GuardedReader:
    """The reader connection: a storage error while reading becomes `StorageUnavailable`
    (a 503 for the request) and marks the store failed, so the committer reopens it."""

    __slots__ = ("conn", "_store")

    def __init__(self, conn: sqlite3.Connection, store: Store) -> None:
        self.conn = conn
        self._store = store

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.DatabaseError as exc:
            if not is_storage_error(exc):
                raise
            self._store.mark_failed(describe(exc))
            raise StorageUnavailable(describe(exc)) from exc


class _NoReader:
    """Stands in for the reader while the database could not be opened at all."""

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        raise StorageUnavailable(self._store.failure or "the database is not open")


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Store:
    """The shard's database. Methods named `read_*`/`load_*` use the reader connection on the
    trio thread; `commit` and `vacuum_step` run in the committer (loop or worker thread).

    Construction tries to open the database once; if that fails the store starts failed
    (`failure` says why) and the committer keeps trying."""

    def __init__(self, data_dir: Path, synchronous: str = "FULL") -> None:
        self.data_dir = data_dir
        self.path = data_dir / "shard.db"
        self._synchronous = synchronous
        self._writer: sqlite3.Connection | None = None
        self._reader: _GuardedReader | _NoReader = _NoReader(self)
        self.failure: str | None = "the database is not open yet"
        self.on_failure: Callable[[], None] = lambda: None  # set by the committer
        # Renewed when the storage fails and when it is (re)opened: a body token names
        # it (shard/slice_cache.py), so nothing named before a failure matches after it.
        self.generation = 0
        # What the journal holds (at most: purges are not subtracted), and the streams
        # with rows in it (a superset); written only by the committer's transactions.
        self.journal_rows = 0
        self.journal_bytes = 0
        self._journal_sids: set[int] = set()
        # The end of each stream's last committed journal row: exact (updated only after a
        # commit, emptied only after a fold), unlike `_journal_sids`, noted before commits.
        # A stored tail lags at most to it (the module docstring).
        self.journal_tails: dict[int, int] = {}
        try:
            self.install(self.connect())
        except StorageUnavailable as exc:
            self.failure = str(exc)
            log.error("cannot open %s: %s; refusing writes until it can be opened", self.path, exc)

    def health(self) -> str:
        return "ok" if self.failure is None else f"failed: {self.failure}"

    def mark_failed(self, reason: str) -> None:
        """Storage failed (a commit or a read): report it until a reopen succeeds."""
        if self.failure is None:
            self.failure = reason
            self.generation += 1
            log.error("storage failed: %s; refusing writes until it recovers", reason)
            self.on_failure()

    def connect(self) -> Connections:
        """Open a writer and a reader, prove the database writable, and see what its
        journal holds.

        May block on the disk (and converts an old database for incremental vacuum), so
        the committer runs it in a worker thread. Raises StorageUnavailable."""
        opened: list[sqlite3.Connection] = []
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            writer = self._connect()
            opened.append(writer)
            self._prepare(writer)  # (its probe write made the WAL file)
            wal_file.presize(self.path, JOURNAL_SIZE_LIMIT)
            # (after `_prepare`: its one-time VACUUM builds a copy of the whole database
            # as a temporary one, which must not be in memory)
            writer.execute("PRAGMA temp_store=MEMORY")
            reader = self._connect()
            opened.append(reader)
            reader.execute(f"PRAGMA cache_size={-READ_CACHE_KIB}")
            rows, size = writer.execute(
                "SELECT count(*), coalesce(sum(length(data)), 0) FROM journal"
            ).fetchone()
            tails = dict(writer.execute("SELECT sid, max(end_pos) FROM journal GROUP BY sid"))
            return Connections(writer, reader, rows, size, tails)
        except (sqlite3.Error, OSError) as exc:
            for conn in opened:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            raise StorageUnavailable(describe(exc)) from exc

    def install(self, opened: Connections) -> None:
        """Start using connections from `connect` (on the loop, between commits): the old
        ones are closed after the new ones are open, so the database stays locked."""
        old_writer, old_reader = self._writer, self._reader
        self._writer = opened.writer
        self.journal_rows, self.journal_bytes = opened.journal_rows, opened.journal_bytes
        self.journal_tails = opened.journal_tails
        self._journal_sids = set(opened.journal_tails)
        self._reader = _GuardedReader(opened.reader, self)
        self.generation += 1
        if self.failure is not None and old_writer is not None:
            log.warning("storage recovered: %s is writable again", self.path)
        self.failure = None
        for conn in (old_writer, getattr(old_reader, "conn", None)):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def connect_side(self, schema: str) -> sqlite3.Connection:
        """Another connection to this database, with the same VFS and pragmas, for a
        module that keeps its own tables and transactions (`shard.subscriptions`);
        `schema` (CREATE ... IF NOT EXISTS) is applied first. Raises StorageUnavailable."""
        try:
            conn = self._connect()
            conn.executescript(schema)
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(describe(exc)) from exc
        return conn

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path))}?vfs={VFS}"  # a '?' or '%' in the path stays one
        conn = sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=STATEMENT_CACHE,
        )
        try:
            # auto_vacuum first: on a new database it only takes before the first write,
            # and switching to WAL is one.
            conn.execute(f"PRAGMA auto_vacuum={AUTO_VACUUM_INCREMENTAL}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            conn.execute("PRAGMA mmap_size=0")  # no mapped file: storage errors, not SIGBUS
            conn.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, writer: sqlite3.Connection) -> None:
        if writer.execute("PRAGMA auto_vacuum").fetchone()[0] != AUTO_VACUUM_INCREMENTAL:
            # A database created before incremental vacuum: convert it once (rewrites it).
            started = time.monotonic()
            writer.execute("VACUUM")
            log.info(
                "converted %s for incremental vacuum in %.1f s",
                self.path,
                time.monotonic() - started,
            )
        writer.executescript(SCHEMA)
        # SQLite opens an unwritable file read-only without a word; find out now.
        writer.execute("INSERT OR REPLACE INTO probe (id, opened_at) VALUES (1, ?)", (time.time(),))

    def close(self) -> None:
        for conn in (self._writer, getattr(self._reader, "conn", None)):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._writer = None
        self._reader = _NoReader(self)

    # -- space ------------------------------------------------------------------------------

    def freelist_pages(self) -> int:
        """Pages freed by deletes and not yet returned to the filesystem."""
        conn = self._require_writer()
        pages: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages

    def vacuum_step(self, pages: int) -> int:
        """Return up to `pages` free pages to the filesystem in one short transaction;
        return how many free pages are left."""
        conn = self._require_writer()
        # executescript steps the pragma to completion (execute would free one page).
        conn.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
        left: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if not left:
            # The database file shrinks when the WAL is copied back into it; do that now
            # rather than at the next automatic checkpoint, which may be a long way off.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return left

    def _require_writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StorageUnavailable(self.failure or "the database is not open")
        return self._writer

    # -- reads (trio thread) -------------------------------------------------------------

    def load_stream(self, path: str) -> tuple[int, StreamState] | None:
        tails = self.journal_tails_now()  # before the row: see there
        row = self._reader.execute(
            "SELECT sid, state FROM streams WHERE path = ?", (path,)
        ).fetchone()
        if row is None:
            return None
        sid, blob = row
        producers = {
            producer: ProducerState(epoch, seq)
            for producer, epoch, seq in self._reader.execute(
                "SELECT producer, epoch, seq FROM producers WHERE sid = ?", (sid,)
            )
        }
        state = decode_state(path, blob, producers)
        tail = self.tail_of(tails, sid, state.tail)
        return sid, evolve(state, tail=tail) if tail != state.tail else state

    def journal_tails_now(self) -> dict[int, int]:
        """The journal's tails, to be taken *before* reading stored states that
        `tail_of` corrects: a fold updates the rows it brings up to date before it empties
        the map, so a map taken first never misses what a row read after it lacks."""
        return self.journal_tails.copy()

    @staticmethod
    def tail_of(tails: Mapping[int, int], sid: int, stored: int) -> int:
        """A stream's committed tail: its stored state's, or the end of its last journal
        row when that is further (`tails` from `journal_tails_now`)."""
        tail = tails.get(sid, 0)
        return tail if tail > stored else stored

    def read_records(
        self, sid: int, position: int, max_bytes: int, *, below: int | None = None
    ) -> list[Record]:
        """Committed records with end > position, in order, until max_bytes are gathered
        (at least one when any exists). With `below`, only records starting below it."""
        rows, _ = self._read_rows(True, sid, position, max_bytes, below)
        return list(itertools.starmap(Record, rows))

    def read_buffers(
        self, sid: int, position: int, max_bytes: int, *, below: int | None = None
    ) -> tuple[int, int, list[bytes]]:
        """What `read_records` reads, without a Record per row: `(start, end, datas)`, the
        run from the first record's start to the last one's end and their datas in order,
        for a sender that writes them with one `sendmsg` (or joins them once). A stream's
        records are contiguous (appends go at its tail; purges drop whole prefixes).
        Nothing to read: `(position, position, [])`."""
        rows, start = self._read_rows(False, sid, position, max_bytes, below)
        if not rows:
            return position, position, []
        return start, rows[-1][-2], list(map(_DATA, rows))

    def read_joined(
        self, sid: int, position: int, max_bytes: int, *, below: int | None = None
    ) -> Record | None:
        """What `read_buffers` reads, as one record whose data is the datas joined (once,
        in C). Only for data whose records concatenate (raw bytes; not JSON messages)."""
        start, end, datas = self.read_buffers(sid, position, max_bytes, below=below)
        return Record(start, end, b"".join(datas)) if datas else None

    def _read_rows(
        self, starts: bool, sid: int, position: int, max_bytes: int, below: int | None
    ) -> tuple[list[tuple[Any, ...]], int]:
        """`(start_pos, end_pos, data)` rows (without start_pos unless `starts` or
        `below`) of the committed records with end > position, in order, until max_bytes
        are gathered (at least one when any exists), only those starting below `below`
        when given; and the first row's start_pos. Rows come in batches, cut (by size, by
        `below`) where C-level accumulate and bisect say, not by a Python step per row."""
        rows: list[tuple[Any, ...]] = []
        total = 0
        full = False  # max_bytes gathered, or a row starting at `below` met
        first_start = position
        starts = starts or below is not None
        columns = "start_pos, end_pos, data" if starts else "end_pos, data"
        reader = self._reader
        # One snapshot for both tables: a fold committing between two statements would
        # otherwise move rows from the journal into `records` behind the first one's back.
        reader.execute("BEGIN")
        try:
            for table in ("records", "journal"):
                if full:
                    break
                had = len(rows)
                # the journal is a heap: this scans it (it is kept small) and sorts the few
                # rows of this stream
                cursor = reader.execute(
                    f"SELECT {columns} FROM {table} WHERE sid = ? AND end_pos > ? ORDER BY end_pos",
                    (sid, rows[-1][-2] if rows else position),
                )
                try:
                    size = READ_FIRST_ROWS
                    while batch := cursor.fetchmany(size):
                        size = READ_BATCH_ROWS
                        if below is not None and batch[-1][0] >= below:
                            batch = batch[: bisect.bisect_left(list(map(_FIRST, batch)), below)]
                            full = True
                        if not batch:
                            break
                        sizes = list(itertools.accumulate(map(len, map(_DATA, batch))))
                        if total + sizes[-1] >= max_bytes:
                            batch = batch[: bisect.bisect_left(sizes, max_bytes - total) + 1]
                            full = True
                        total += sizes[-1]
                        rows += batch
                        if full:
                            break
                finally:
                    cursor.close()
                if had == 0 and rows and not starts:
                    found = reader.execute(
                        f"SELECT start_pos FROM {table} WHERE sid = ? AND end_pos = ?",
                        (sid, rows[0][-2]),
                    ).fetchone()
                    first_start = found[0]
        finally:
            with contextlib.suppress(sqlite3.Error, StorageUnavailable):
                reader.execute("COMMIT")
        if starts and rows:
            first_start = rows[0][0]
        return rows, first_start

    def max_sid(self) -> int:
        """The highest stream id in use, staged arrivals included."""
        sid: int = self._reader.execute(
            "SELECT max((SELECT coalesce(max(sid), 0) FROM streams), "
            "(SELECT coalesce(max(sid), 0) FROM arrivals))"
        ).fetchone()[0]
        return sid

    def count_records(self, sid: int, limit: int) -> int:
        """How many folded records stream `sid` has (those `purge_slice` deletes), counting
        no further than `limit`. Its rows in the journal (a small table) go with the
        stream's final purge."""
        count: int = self._reader.execute(
            "SELECT count(*) FROM (SELECT 1 FROM records WHERE sid = ? LIMIT ?)", (sid, limit)
        ).fetchone()[0]
        return count

    def has_stream(self, path: str) -> bool:
        return (
            self._reader.execute("SELECT 1 FROM streams WHERE path = ?", (path,)).fetchone()
            is not None
        )

    def load_meta(self, key: str) -> bytes | None:
        row = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def load_arrivals(self) -> list[Arrival]:
        return [
            Arrival(*row)
            for row in self._reader.execute(
                "SELECT path, source, version, sid, received FROM arrivals"
            )
        ]

    def load_departure(self, path: str) -> tuple[str, int] | None:
        """(target, ring version) `path` was last sent whole to, if not yet deleted."""
        row = self._reader.execute(
            "SELECT target, version FROM departures WHERE path = ?", (path,)
        ).fetchone()
        return (row[0], row[1]) if row is not None else None

    def load_arrived(self, path: str) -> tuple[str, int] | None:
        """(source, ring version) of the last completed arrival of `path`, if any."""
        row = self._reader.execute(
            "SELECT source, version FROM arrived WHERE path = ?", (path,)
        ).fetchone()
        return (row[0], row[1]) if row is not None else None

    def paths_after(self, path: str, limit: int) -> list[tuple[str, int]]:
        """(path, tail) of up to `limit` streams after `path` in path order: a scan of
        every stream in slices short enough for the loop."""
        tails = self.journal_tails_now()
        rows = self._reader.execute(
            "SELECT path, sid, state FROM streams WHERE path > ? ORDER BY path LIMIT ?",
            (path, limit),
        ).fetchall()
        tail_of = self.tail_of
        return [(p, tail_of(tails, sid, decode_state(p, blob, {}).tail)) for p, sid, blob in rows]

    def refs_on(self, path: str) -> list[str]:
        """The fork references held on stream `path`."""
        rows = self._reader.execute("SELECT ref FROM fork_refs WHERE path = ?", (path,))
        return [ref for (ref,) in rows]

    def counts(self) -> tuple[int, int]:
        """(streams, bytes in use by the database): for status reports, cheaply."""
        streams: int = self._reader.execute("SELECT count(*) FROM streams").fetchone()[0]
        pages: int = self._reader.execute("PRAGMA page_count").fetchone()[0]
        free: int = self._reader.execute("PRAGMA freelist_count").fetchone()[0]
        size: int = self._reader.execute("PRAGMA page_size").fetchone()[0]
        return streams, (pages - free) * size

    def has_ref(self, ref: str) -> bool:
        return (
            self._reader.execute("SELECT 1 FROM fork_refs WHERE ref = ?", (ref,)).fetchone()
            is not None
        )

    def ref_source(self, ref: str) -> str | None:
        """The stream that fork reference `ref` is held on, if it is held."""
        row = self._reader.execute("SELECT path FROM fork_refs WHERE ref = ?", (ref,)).fetchone()
        return row[0] if row is not None else None

    def load_deadlines(self) -> Iterator[tuple[str, float]]:
        yield from self._reader.execute(
            "SELECT path, deadline FROM streams WHERE deadline IS NOT NULL"
        )

    def load_outbox(self) -> list[tuple[str, str, str]]:
        """Fork releases ('provisional', 'due'); subscription notices share the table
        (`load_notices`), so that they commit with the appends that cause them."""
        return list(
            self._reader.execute(
                "SELECT ref, source, status FROM outbox WHERE status != ?", (NOTICE_STATUS,)
            )
        )

    def load_notices(self) -> list[tuple[str, str]]:
        """Subscription notices not yet delivered: (key, stream path)."""
        return list(
            self._reader.execute(
                "SELECT ref, source FROM outbox WHERE status = ?", (NOTICE_STATUS,)
            )
        )

    def fork_ref_in_use(self, ref: str) -> bool:
        return (
            self._reader.execute("SELECT 1 FROM streams WHERE fork_ref = ?", (ref,)).fetchone()
            is not None
        )

    # -- the write path (committer thread) -------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """Apply `batch` in one transaction; raises (after rolling back) on any failure."""
        conn = self._require_writer()
        pending = _PendingRows()
        conn.execute("BEGIN IMMEDIATE")
        try:
            journal_sids = self._journal_sids
            for write in batch.streams:
                if write.accessed is not None and write.sid in journal_sids:
                    # `_apply_stream` of a plain append (`append_write` with `accessed`)
                    # to a stream with journal rows, written out: its row, no state, no
                    # producers (38 such writes: 661k -> 564k instructions for the commit).
                    record = write.records[0]
                    pending.journal += (write.sid, record.end, record.start, bytearray(record.data))
                else:
                    self._apply_stream(conn, write, pending)
            pending.flush(conn)
            for path, state in batch.touches:
                conn.execute(
                    "UPDATE streams SET state = ?, deadline = ? WHERE path = ?",
                    (encode_state(state), state.deadline(), path),
                )
            # (each only when it has rows: an empty executemany still makes a cursor and
            # looks its statement up, four times in most commits)
            if batch.refs_added:
                conn.executemany(
                    "INSERT OR REPLACE INTO fork_refs (ref, path) VALUES (?, ?)", batch.refs_added
                )
            if batch.refs_removed:
                conn.executemany(
                    "DELETE FROM fork_refs WHERE ref = ?", [(r,) for r in batch.refs_removed]
                )
            if batch.outbox_put:
                conn.executemany(
                    "INSERT OR REPLACE INTO outbox (ref, source, status) VALUES (?, ?, ?)",
                    batch.outbox_put,
                )
            if batch.outbox_removed:
                conn.executemany(
                    "DELETE FROM outbox WHERE ref = ?", [(r,) for r in batch.outbox_removed]
                )
            for statement in batch.statements:
                if statement.many:
                    conn.executemany(statement.sql, statement.params)  # type: ignore[arg-type]
                else:
                    conn.execute(statement.sql, statement.params)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self.journal_rows += pending.journal_rows
        self.journal_bytes += pending.journal_bytes
        tails = self.journal_tails
        tails.update(pending.tails)
        for sid in pending.purged:
            tails.pop(sid, None)

    def fold_due(self) -> bool:
        return self.journal_rows >= FOLD_ROWS or self.journal_bytes >= FOLD_BYTES

    def fold(self) -> None:
        """Move the whole journal into `records` in one transaction (committer thread),
        sorted so that each stream's rows are appended to its leaf pages together."""
        conn = self._require_writer()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO records (sid, end_pos, start_pos, data) "
                "SELECT sid, end_pos, start_pos, data FROM journal ORDER BY sid, end_pos"
            )
            conn.executemany(
                "UPDATE streams SET state = ? WHERE sid = ?", self._lagging_states(conn)
            )
            conn.execute("DELETE FROM journal")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self.journal_rows = self.journal_bytes = 0
        self._journal_sids.clear()
        self.journal_tails = {}  # (a new map: a reader may hold the old one)

    def _lagging_states(self, conn: sqlite3.Connection) -> list[tuple[bytes, int]]:
        """(state, sid) of each stored state whose tail lags its journal rows, brought up
        to date, for the fold that empties the journal (and with it `journal_tails`)."""
        updates = []
        for sid, tail in self.journal_tails.items():
            row = conn.execute("SELECT path, state FROM streams WHERE sid = ?", (sid,)).fetchone()
            if row is None:
                continue  # a stream gone (its rows went with it)
            state = decode_state(row[0], row[1], {})
            if state.tail < tail:
                updates.append((encode_state(evolve(state, tail=tail)), sid))
        return updates

    def _apply_stream(
        self, conn: sqlite3.Connection, write: StreamWrite, pending: _PendingRows
    ) -> None:
        """Write one stream's change. A further write of a stored stream (an append) only
        adds rows to `pending`, written in one statement per table; anything else (a new
        stream, a new incarnation, a purge) first writes what `pending` holds, so the
        batch's statements keep their order."""
        state = write.state
        if state is None or write.old_sid is None or write.old_sid != write.sid:
            pending.flush(conn)
            if write.old_sid is not None and write.old_sid != write.sid:
                _purge(conn, write.old_sid)
                pending.purged.append(write.old_sid)
                conn.execute("DELETE FROM streams WHERE sid = ?", (write.old_sid,))
            if state is None:
                _purge(conn, write.sid)
                pending.purged.append(write.sid)
                conn.execute("DELETE FROM streams WHERE path = ?", (write.path,))
                return
            conn.execute(_UPSERT_STREAM, _stream_row(write.path, write.sid, state))
            stored = True
        else:
            stored = False
        records = write.records
        if records:
            sid = write.sid
            journal_sids = self._journal_sids
            if sid not in journal_sids and sum(len(r.data) for r in records) >= DIRECT_WRITE_BYTES:
                conn.executemany(
                    "INSERT INTO records (sid, end_pos, start_pos, data) VALUES (?, ?, ?, ?)",
                    [(sid, r.end, r.start, r.data) for r in records],
                )
            else:
                # Noted before the commit: a superset is harmless (a later large write
                # goes to the journal), a missing stream would not be.
                journal_sids.add(sid)
                # The data as a bytearray, stored as the same BLOB: sqlite3 binds it as it
                # is, where a `bytes` parameter first goes through its adapter lookup (two
                # failed attribute lookups, one raising inside), 3.3k instructions per row
                # against a copy of a small record's bytes.
                for r in records:
                    pending.journal += (sid, r.end, r.start, bytearray(r.data))
                if not stored and (write.tail_moved or _only_tail_moved(write.previous, state)):
                    stored = True  # its journal rows say where its tail is now
        if not stored:
            if write.accessed is not None:
                # An advancing write's state is its stream's state before the append, and
                # its rows went to `records`, not the journal: no journal row gives the
                # stored tail, so the state written is the advanced one.
                state = advance(state, records[-1].end, write.accessed)
            pending.states[write.path] = (write.sid, state)
        if state.producers is write.previous_producers:  # an append without a producer
            return
        changed = _changed_producers(state.producers, write.previous_producers or {})
        if changed:
            pending.producers += [(write.sid, pid, p.epoch, p.last_seq) for pid, p in changed]


class _PendingRows:
    """Rows of a batch's appends not yet written: their journal rows, changed producers
    and new stream states (only the last one per path is encoded), each written with one
    `executemany`.
    A stream's state is an UPDATE of its row, not the upsert that a new stream needs:
    that tries an insert first and rewrites the row's `sid` index entry, which made the
    state's write cost about twice its journal row's. A stream without a TTL, an expiry
    time or a fork origin (none of which an append changes) has had no deadline and no
    fork ref since it was created: its UPDATE sets only the state, a third cheaper."""

    __slots__ = (
        "journal",
        "journal_bytes",
        "journal_rows",
        "producers",
        "purged",
        "states",
        "tails",
    )

    def __init__(self) -> None:
        # The journal rows' values one after the other (sid, end, start, data; ...), as
        # their INSERT statements bind them (`_insert_journal`).
        self.journal: list[Any] = []
        self.producers: list[tuple[int, str, int, int]] = []
        self.states: dict[str, tuple[int, StreamState]] = {}  # path -> (sid, its newest state)
        self.journal_rows = 0
        self.journal_bytes = 0
        # For `Store.journal_tails` once the batch commits: the end of each stream's last
        # journal row written, and the streams whose rows were purged (after those).
        self.tails: dict[int, int] = {}
        self.purged: list[int] = []

    def flush(self, conn: sqlite3.Connection) -> None:
        journal = self.journal
        if journal:
            _insert_journal(conn, journal)
            self.journal_rows += len(journal) // _JOURNAL_COLUMNS
            self.journal_bytes += sum(map(len, journal[3::_JOURNAL_COLUMNS]))
            # in commit order: a stream's last row is its tail
            sids, ends = journal[::_JOURNAL_COLUMNS], journal[1::_JOURNAL_COLUMNS]
            self.tails.update(zip(sids, ends, strict=True))
            self.journal = []
        if self.producers:
            conn.executemany(
                "INSERT OR REPLACE INTO producers (sid, producer, epoch, seq) VALUES (?, ?, ?, ?)",
                self.producers,
            )
            self.producers = []
        states = self.states
        if states:
            plain: list[tuple[bytes, str]] = []
            timed: list[tuple[float | None, str | None, bytes, str]] = []
            for path, (_sid, state) in states.items():
                if state.ttl is None and state.expires_at_ts is None and state.fork is None:
                    plain.append((encode_state(state), path))
                else:
                    fork_ref = state.fork.ref if state.fork else None
                    timed.append((state.deadline(), fork_ref, encode_state(state), path))
            updated = 0
            if plain:
                sql = "UPDATE streams SET state = ? WHERE path = ?"
                updated += conn.executemany(sql, plain).rowcount
            if timed:
                sql = "UPDATE streams SET deadline = ?, fork_ref = ?, state = ? WHERE path = ?"
                updated += conn.executemany(sql, timed).rowcount
            if updated != len(states):
                # A row that is not there (not expected: a stored stream's row stays until
                # its purge) is written as the upsert would have: the write is not lost.
                log.warning("%d appended streams had no row", len(states) - updated)
                conn.executemany(_UPSERT_STREAM, [_stream_row(p, *v) for p, v in states.items()])
            self.states = {}


_JOURNAL_COLUMNS = 4  # sid, end_pos, start_pos, data
JOURNAL_INSERT_ROWS = 64  # journal rows one INSERT writes at most (`_insert_journal`)
# The INSERT of n journal rows, by n: one statement with the rows of a group commit
# cost about half of `executemany`'s statement per row (callgrind: 34 rows of 100 B,
# 303k -> 174k instructions for the transaction); a statement per row count up to
# JOURNAL_INSERT_ROWS, which the writer's statement cache keeps (`Store._connect`).
_JOURNAL_INSERTS = [""] + [
    "INSERT INTO journal (sid, end_pos, start_pos, data) VALUES " + ", ".join(["(?, ?, ?, ?)"] * n)
    for n in range(1, JOURNAL_INSERT_ROWS + 1)
]


def _insert_journal(conn: sqlite3.Connection, values: list[Any]) -> None:
    """Insert the journal rows whose values are `values` (`_PendingRows.journal`), in
    order, JOURNAL_INSERT_ROWS at a time."""
    step = JOURNAL_INSERT_ROWS * _JOURNAL_COLUMNS
    if len(values) <= step:
        conn.execute(_JOURNAL_INSERTS[len(values) // _JOURNAL_COLUMNS], values)
        return
    for start in range(0, len(values), step):
        chunk = values[start : start + step]
        conn.execute(_JOURNAL_INSERTS[len(chunk) // _JOURNAL_COLUMNS], chunk)


def _only_tail_moved(previous: StreamState | None, state: StreamState) -> bool:
    """Whether the row holding `previous` may stay as it is for `state` (the journal's
    rows give the new tail: see the module docstring): a stream whose last access nothing
    reads (no TTL, no expiry time, no fork origin), whose stored state besides its tail
    and last access (producers have their own table, the path is the row's key) did not
    change. Written out attribute by attribute: an `attrgetter` of the eleven, applied to
    both states, cost about 6k instructions per append (its generic lookups)."""
    return (
        previous is not None
        and state.ttl is None
        and state.expires_at_ts is None
        and state.fork is None
        and previous.ttl is None
        and previous.expires_at_ts is None
        and previous.fork is None
        and previous.closed == state.closed
        and previous.content_type == state.content_type
        and previous.created_at == state.created_at
        and previous.expires_at == state.expires_at
        and previous.last_stream_seq == state.last_stream_seq
        and previous.closed_by == state.closed_by
        and previous.soft_deleted == state.soft_deleted
        and previous.refcount == state.refcount
    )


def _stream_row(
    path: str, sid: int, state: StreamState
) -> tuple[str, int, float | None, str | None, bytes]:
    """The parameters of `_UPSERT_STREAM`."""
    return (
        path,
        sid,
        state.deadline(),
        state.fork.ref if state.fork else None,
        encode_state(state),
    )


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the commit's error is the news
            conn.execute("ROLLBACK")


def _purge(conn: sqlite3.Connection, sid: int) -> None:
    conn.execute("DELETE FROM records WHERE sid = ?", (sid,))
    conn.execute("DELETE FROM journal WHERE sid = ?", (sid,))
    conn.execute("DELETE FROM producers WHERE sid = ?", (sid,))


def _changed_producers(
    current: Mapping[str, ProducerState], previous: Mapping[str, ProducerState]
) -> Iterable[tuple[str, ProducerState]]:
    if current is previous:
        return ()
    return [(pid, p) for pid, p in current.items() if previous.get(pid) != p]
