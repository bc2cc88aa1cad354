"""The subscription tables in the shard's SQLite database, on connections of their own.

`subscriptions` holds each subscription this shard owns (its whole state as JSON, one row
per id); `sub_registrations` holds what this shard must notify about: (subscription,
'glob', pattern) for every subscription with a pattern, on every shard, and
(subscription, 'explicit', path) on the shard owning that path. Notices themselves are
rows of the store's `outbox` (they must commit with the appends that cause them).

Writes run in a worker thread on a writer connection of their own, one short transaction
each, serialized by a lock (concurrent callers share one transaction); reads run on the
loop on a reader connection, which sees committed data only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence

import trio

from ds_cluster.shard.core.subscriptions import Sub
from ds_cluster.shard.store import (
    StorageUnavailable,
    Store,
    decode_state,
    describe,
    is_storage_error,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sub_registrations (
    sub_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (sub_id, kind, value)
) WITHOUT ROWID;
"""

Registration = tuple[str, str, str]  # (sub id, 'glob' | 'explicit', pattern or path)


class SubDb:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        self._dirty: dict[str, str | None] = {}  # sub id -> state JSON (None: delete)

    def open(self) -> None:
        self._writer = self._store.connect_side(SCHEMA)
        self._reader = self._store.connect_side("")

    def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None

    # -- reads (loop) ---------------------------------------------------------------------

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        if self._reader is None:
            raise StorageUnavailable("subscription tables are not open")
        try:
            return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if is_storage_error(exc):
                raise StorageUnavailable(describe(exc)) from exc
            raise

    def load_subs(self) -> list[Sub]:
        return [
            Sub.from_json(json.loads(str(s)))
            for _i, s in self._read("SELECT id, state FROM subscriptions")
        ]

    def load_registrations(self) -> list[Registration]:
        return [
            (str(a), str(b), str(c))
            for a, b, c in self._read("SELECT sub_id, kind, value FROM sub_registrations")
        ]

    def stream_tails(self, paths: list[str]) -> dict[str, int | None]:
        """The committed tail position of each path (None: no live stream)."""
        out: dict[str, int | None] = {}
        tails = self._store.journal_tails_now()  # (before the rows: see there)
        for path in paths:
            rows = self._read("SELECT sid, state FROM streams WHERE path = ?", (path,))
            out[path] = _tail(tails, path, rows[0][0], rows[0][1]) if rows else None
        return out

    def streams_under(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, int]], str | None]:
        """One page of (path, committed tail) of the live streams whose path starts with
        `prefix` (a pattern's literal prefix; "" for all), in path order after `after`;
        and where the next page starts (None: that was the last)."""
        tails = self._store.journal_tails_now()  # (before the rows: see there)
        if prefix and not prefix.endswith("/"):  # the pattern is one path
            if after is not None:
                return [], None
            rows = self._read("SELECT path, sid, state FROM streams WHERE path = ?", (prefix,))
        else:
            low, high = prefix, (prefix[:-1] + "0") if prefix else "\U0010ffff"  # '0' > '/'
            if after is not None:
                low = after
            rows = self._read(
                "SELECT path, sid, state FROM streams WHERE path > ? AND path < ? "
                "ORDER BY path LIMIT ?",
                (low, high, limit),
            )
        page = []
        for path, sid, blob in rows:
            tail = _tail(tails, str(path), sid, blob)
            if tail is not None:
                page.append((str(path), tail))
        last = str(rows[-1][0]) if len(rows) == limit else None
        return page, last

    # -- writes (worker thread) -------------------------------------------------------------

    async def save(self, subs: Sequence[Sub], deleted: Sequence[str] = ()) -> None:
        """Durably store these subscriptions' states (and delete `deleted`). Callers
        that come while a transaction runs share the next one."""
        for sub in subs:
            self._dirty[sub.id] = json.dumps(sub.to_json(), separators=(",", ":"))
        for sub_id in deleted:
            self._dirty[sub_id] = None
        async with self._lock:
            if not self._dirty:
                return  # a transaction that started after our changes took them
            batch, self._dirty = self._dirty, {}
            try:
                await trio.to_thread.run_sync(self._write_subs, batch)
            except BaseException:
                for key, value in batch.items():
                    self._dirty.setdefault(key, value)
                raise

    async def register(self, rows: list[Registration]) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._write_registrations, rows, [])

    async def unregister(self, sub_id: str, paths: list[str] | None) -> None:
        """Drop `sub_id`'s registrations (only the explicit ones of `paths` if given)."""
        async with self._lock:
            await trio.to_thread.run_sync(self._write_registrations, [], [(sub_id, paths)])

    def _transaction(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StorageUnavailable("subscription tables are not open")
        return self._writer

    def _write_subs(self, batch: dict[str, str | None]) -> None:
        conn = self._transaction()
        self._run(
            conn,
            lambda: (
                conn.executemany(
                    "INSERT OR REPLACE INTO subscriptions (id, state) VALUES (?, ?)",
                    [(k, v) for k, v in batch.items() if v is not None],
                ),
                conn.executemany(
                    "DELETE FROM subscriptions WHERE id = ?",
                    [(k,) for k, v in batch.items() if v is None],
                ),
            ),
        )

    def _write_registrations(
        self, add: list[Registration], drop: list[tuple[str, list[str] | None]]
    ) -> None:
        conn = self._transaction()

        def apply() -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO sub_registrations (sub_id, kind, value) VALUES (?, ?, ?)",
                add,
            )
            for sub_id, paths in drop:
                if paths is None:
                    conn.execute("DELETE FROM sub_registrations WHERE sub_id = ?", (sub_id,))
                else:
                    conn.executemany(
                        "DELETE FROM sub_registrations WHERE sub_id = ? AND kind = 'explicit' "
                        "AND value = ?",
                        [(sub_id, p) for p in paths],
                    )

        self._run(conn, apply)

    @staticmethod
    def _run(conn: sqlite3.Connection, body: Callable[[], object]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                body()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if is_storage_error(exc):
                raise StorageUnavailable(describe(exc)) from exc
            raise


def _tail(tails: Mapping[int, int], path: str, sid: object, blob: object) -> int | None:
    """A live stream's committed tail (None: soft-deleted), its stored state corrected
    by the journal's `tails` (`Store.tail_of`)."""
    assert isinstance(blob, bytes) and isinstance(sid, int)
    state = decode_state(path, blob, {})
    if state.soft_deleted:
        return None
    return Store.tail_of(tails, sid, state.tail)
