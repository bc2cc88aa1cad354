"""The shard's SQLite store: stream states, their records, producers, fork bookkeeping.

One database per shard, in WAL mode. Two connections: the *reader* lives on the trio
thread and only ever sees committed data (WAL snapshot isolation); the *writer* is used
by the group committer from one worker thread at a time. Everything one batch changes
commits in a single transaction, so producer state, data, closure and fork references are
atomic with each other.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from shard.core.model import ForkOrigin, ProducerState, Record, StreamState

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
-- fork references *we* hold on other streams that must be released: 'provisional' while a
-- fork is being created (released on recovery unless the fork committed), 'due' once the
-- fork is gone. Delivered with retries until the source's shard acknowledges.
CREATE TABLE IF NOT EXISTS outbox (
    ref TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    status TEXT NOT NULL
);
"""


def encode_state(state: StreamState) -> bytes:
    fork = state.fork
    return msgpack.packb(
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
        ],
        use_bin_type=True,
    )


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


@dataclass
class StreamWrite:
    """One stream's change within a batch: the state to store (None = purge)."""

    path: str
    sid: int
    old_sid: int | None  # the incarnation being replaced or purged, if any
    state: StreamState | None
    records: tuple[Record, ...] = ()
    previous_producers: dict[str, ProducerState] | None = None


@dataclass
class Batch:
    """Everything one transaction writes."""

    streams: list[StreamWrite] = field(default_factory=list)
    touches: list[tuple[str, StreamState]] = field(default_factory=list)
    refs_added: list[tuple[str, str]] = field(default_factory=list)  # (ref, path)
    refs_removed: list[str] = field(default_factory=list)
    outbox_put: list[tuple[str, str, str]] = field(default_factory=list)  # (ref, source, status)
    outbox_removed: list[str] = field(default_factory=list)


class Store:
    """The shard's database. Methods named `read_*`/`load_*` use the reader connection on the
    trio thread; `commit` runs in the committer's worker thread."""

    def __init__(self, data_dir: Path, synchronous: str = "FULL") -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "shard.db"
        self._writer = self._connect(synchronous, check_same_thread=False)
        self._writer.executescript(SCHEMA)
        self._reader = self._connect(synchronous, check_same_thread=True)

    def _connect(self, synchronous: str, *, check_same_thread: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=check_same_thread)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    # -- reads (trio thread) -------------------------------------------------------------

    def load_stream(self, path: str) -> tuple[int, StreamState] | None:
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
        return sid, decode_state(path, blob, producers)

    def read_records(
        self, sid: int, position: int, max_bytes: int, *, below: int | None = None
    ) -> list[Record]:
        """Committed records with end > position, in order, until max_bytes are gathered
        (at least one when any exists). With `below`, only records starting below it."""
        records: list[Record] = []
        total = 0
        cursor = self._reader.execute(
            "SELECT start_pos, end_pos, data FROM records WHERE sid = ? AND end_pos > ? "
            "ORDER BY end_pos",
            (sid, position),
        )
        for start, end, data in cursor:
            if below is not None and start >= below:
                break
            records.append(Record(start, end, data))
            total += len(data)
            if total >= max_bytes:
                break
        cursor.close()
        return records

    def max_sid(self) -> int:
        return self._reader.execute("SELECT coalesce(max(sid), 0) FROM streams").fetchone()[0]

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
        return list(self._reader.execute("SELECT ref, source, status FROM outbox"))

    def fork_ref_in_use(self, ref: str) -> bool:
        return (
            self._reader.execute("SELECT 1 FROM streams WHERE fork_ref = ?", (ref,)).fetchone()
            is not None
        )

    # -- the write path (committer thread) -------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """Apply `batch` in one transaction; raises (after rolling back) on any failure."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            for write in batch.streams:
                self._apply_stream(conn, write)
            for path, state in batch.touches:
                conn.execute(
                    "UPDATE streams SET state = ?, deadline = ? WHERE path = ?",
                    (encode_state(state), state.deadline(), path),
                )
            conn.executemany(
                "INSERT OR REPLACE INTO fork_refs (ref, path) VALUES (?, ?)", batch.refs_added
            )
            conn.executemany(
                "DELETE FROM fork_refs WHERE ref = ?", [(r,) for r in batch.refs_removed]
            )
            conn.executemany(
                "INSERT OR REPLACE INTO outbox (ref, source, status) VALUES (?, ?, ?)",
                batch.outbox_put,
            )
            conn.executemany(
                "DELETE FROM outbox WHERE ref = ?", [(r,) for r in batch.outbox_removed]
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _apply_stream(conn: sqlite3.Connection, write: StreamWrite) -> None:
        state = write.state
        if write.old_sid is not None and write.old_sid != write.sid:
            _purge(conn, write.old_sid)
            conn.execute("DELETE FROM streams WHERE sid = ?", (write.old_sid,))
        if state is None:
            _purge(conn, write.sid)
            conn.execute("DELETE FROM streams WHERE path = ?", (write.path,))
            return
        conn.execute(
            "INSERT INTO streams (path, sid, deadline, fork_ref, state) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET sid = excluded.sid, deadline = excluded.deadline, "
            "fork_ref = excluded.fork_ref, state = excluded.state",
            (
                write.path,
                write.sid,
                state.deadline(),
                state.fork.ref if state.fork else None,
                encode_state(state),
            ),
        )
        if write.records:
            conn.executemany(
                "INSERT INTO records (sid, end_pos, start_pos, data) VALUES (?, ?, ?, ?)",
                [(write.sid, r.end, r.start, r.data) for r in write.records],
            )
        previous = write.previous_producers or {}
        changed = _changed_producers(state.producers, previous)
        if changed:
            conn.executemany(
                "INSERT OR REPLACE INTO producers (sid, producer, epoch, seq) VALUES (?, ?, ?, ?)",
                [(write.sid, pid, p.epoch, p.last_seq) for pid, p in changed],
            )


def _purge(conn: sqlite3.Connection, sid: int) -> None:
    conn.execute("DELETE FROM records WHERE sid = ?", (sid,))
    conn.execute("DELETE FROM producers WHERE sid = ?", (sid,))


def _changed_producers(
    current: dict[str, ProducerState], previous: dict[str, ProducerState]
) -> Iterable[tuple[str, ProducerState]]:
    if current is previous:
        return ()
    return [(pid, p) for pid, p in current.items() if previous.get(pid) != p]
