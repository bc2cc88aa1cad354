"""The shard's in-memory view of its streams: one `Entry` per stream path.

Each entry holds two states. `pending` includes writes queued for the next group commit;
writes are validated against it so a stream's requests serialize without locks (the
shard's single trio thread is the stream's mutex). `committed` is what the database holds;
reads, live readers and the hub see only that, so nothing unacknowledged is ever served.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ds_cluster.shard.core.headers import is_json
from ds_cluster.shard.core.model import Record, StreamState, advance
from ds_cluster.shard.slice_cache import MIN_SLICE_BYTES, SliceCache, body_token
from ds_cluster.shard.store import StorageUnavailable, Store

RECENT_BYTES = 256 * 1024  # committed tail kept in memory for live readers
MAX_CACHED_ENTRIES = 50_000  # idle streams kept in memory beyond this are reloaded on use
_incarnations = itertools.count(1)  # Entry.incarnation: never the same number twice


@dataclass(eq=False)
class Entry:
    """One stream's states (`committed`, `pending`), its live readers, its recent records.

    A plain append does not copy its stream's state (core.model.advance, about 3.2k
    instructions of the 4k that a copy and its release cost): its new tail and last
    access are kept beside the state they advance (`*_tail`, `*_access`, flagged by
    `*_moved`; see `core.plain_append_at`), and the advanced state is made only when
    `committed` or `pending` is read, once for all the appends since. The `*_base` fields
    are for the code that decides or commits such appends, and for reads that take the
    property only when moved (a property's call costs about 800 instructions); everything
    else reads the two properties."""

    path: str
    committed_base: StreamState | None = None
    committed_sid: int | None = None
    pending_base: StreamState | None = None
    pending_sid: int | None = None
    # With `*_moved`: the state is `*_base` advanced to this tail at this last access.
    committed_tail: int = 0
    committed_access: float = 0.0
    committed_moved: bool = False
    pending_tail: int = 0
    pending_access: float = 0.0
    pending_moved: bool = False
    inflight: int = 0  # writes queued or committing
    waiters: int = 0  # live readers parked on this entry
    # contiguous committed records ending at the committed tail (for live readers); a
    # deque: every append drops the oldest once RECENT_BYTES are held
    recent: deque[Record] = field(default_factory=deque)
    recent_bytes: int = 0
    # which data this entry describes, for the slice cache: new for every entry, and again
    # whenever its stream's data is dropped or replaced (`forget`)
    incarnation: int = field(default_factory=lambda: next(_incarnations))
    _changed: trio.Event | None = None  # made when a reader first waits (`changed_event`)
    _settled: trio.Event | None = None
    # Live readers parked here without a waiting task: long-polls (`shard.polls`) and
    # SSE sessions at the tail (`shard.live_sse`), each a function that serves it when the
    # stream changed and returns True to stay parked, or False; `notify` calls them. None
    # when there are none (most entries).
    polls: list[Callable[[], bool]] | None = None

    def idle(self) -> bool:
        """Nothing in memory that the database does not also hold."""
        return self.inflight == 0 and self.waiters == 0

    def absent(self) -> bool:
        return self.committed_base is None and self.pending_base is None and self.idle()

    # -- the states, advanced by plain appends when read -------------------------------------

    @property
    def committed(self) -> StreamState | None:
        """What the database holds (reads, live readers and the hub see only this)."""
        if self.committed_moved:
            self.committed_moved = False
            self.committed_base = advance(
                self.committed_base,  # type: ignore[arg-type]  # (moved: not None)
                self.committed_tail,
                self.committed_access,
            )
        return self.committed_base

    @committed.setter
    def committed(self, state: StreamState | None) -> None:
        self.committed_base = state
        self.committed_moved = False

    @property
    def pending(self) -> StreamState | None:
        """The committed state with the writes queued for the next group commit."""
        if self.pending_moved:
            self.pending_moved = False
            self.pending_base = advance(
                self.pending_base,  # type: ignore[arg-type]  # (moved: not None)
                self.pending_tail,
                self.pending_access,
            )
        return self.pending_base

    @pending.setter
    def pending(self, state: StreamState | None) -> None:
        self.pending_base = state
        self.pending_moved = False

    # -- the hub: wake live readers when committed state changes ----------------------------

    def changed_event(self) -> trio.Event:
        """Set at the next `notify` (a commit on this stream, or a ring change)."""
        changed = self._changed
        if changed is None:
            changed = self._changed = trio.Event()
        return changed

    def notify(self) -> None:
        """Wake the readers waiting for a change; an event is made only for a stream
        that has them (most commits have none). Parked long-polls are answered, and
        parked SSE sessions sent their chunks, here, by the caller's task (the
        committer's, right after the commit): no task is woken for them."""
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()
        polls = self.polls
        if polls is not None:
            self.polls = None
            kept = [poll for poll in polls if poll()]
            if kept:
                if self.polls is None:
                    self.polls = kept
                else:
                    self.polls[:0] = kept

    def park(self, reader: Callable[[], bool]) -> None:
        """Park a live reader here: `notify` calls it after each commit of this stream."""
        polls = self.polls
        if polls is None:
            self.polls = [reader]
        else:
            polls.append(reader)

    def unpark(self, reader: Callable[[], bool]) -> None:
        """Take a parked reader off `polls`, if it is there (the list goes when it empties)."""
        polls = self.polls
        if polls is not None:
            try:
                polls.remove(reader)
            except ValueError:
                return
            if not polls:
                self.polls = None

    def committed_write(
        self,
        state: StreamState | None,
        sid: int,
        records: tuple[Record, ...],
        accessed: float | None = None,
    ) -> bool:
        """One of this stream's writes committed (the committer's pass over a group): the
        entry moves forward, its records are remembered, the write is done, and its
        readers are woken unless live readers are parked here. True: they are, and the
        caller notifies once the whole group moved forward (one call per write, where
        this was four). With `accessed` (a plain append's `StreamWrite.accessed`), the
        committed state is `state` advanced to the end of `records` at that time.

        `write_done` and `remember`'s case of one record that follows the last (an
        append's) are written out: 4.2k -> 3.0k instructions per append (callgrind)."""
        self.committed_base = state
        if accessed is None:
            self.committed_moved = False
        else:
            self.committed_tail = records[-1].end
            self.committed_access = accessed
            self.committed_moved = True
        self.committed_sid = sid if state is not None else None
        if len(records) == 1:
            record = records[0]
            recent = self.recent
            if recent and recent[-1].end == record.start:
                recent.append(record)
                held = self.recent_bytes + len(record.data)
                if held >= RECENT_BYTES:
                    held = self._drop_oldest(held)
                self.recent_bytes = held
            else:
                self.remember(records)
        elif records:
            self.remember(records)
        inflight = self.inflight = self.inflight - 1
        if not inflight and self._settled is not None:
            self._settled.set()
            self._settled = None
        if self.polls is not None:
            return True
        changed = self._changed  # (`notify` without polls)
        if changed is not None:
            self._changed = None
            changed.set()
        return False

    async def wait_settled(self) -> None:
        """Wait until no write on this stream is queued or committing."""
        while self.inflight:
            if self._settled is None:
                self._settled = trio.Event()
            await self._settled.wait()

    def write_done(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._settled is not None:
            self._settled.set()
            self._settled = None

    # -- the recent-records cache -------------------------------------------------------------

    def remember(self, records: tuple[Record, ...]) -> None:
        """Keep a committed write's `records` (not empty: the caller checked) at the end
        of `recent`, dropping the oldest beyond RECENT_BYTES."""
        recent = self.recent
        first = records[0]
        if recent and recent[-1].end != first.start:
            recent.clear()
            self.recent_bytes = 0
        recent.extend(records)
        held = self.recent_bytes
        if len(records) == 1:  # (an append's one record: no loop, about 400 instructions less)
            held += len(first.data)
        else:
            for record in records:
                held += len(record.data)
        if held >= RECENT_BYTES:  # (else nothing to drop: most appends, 700 instructions)
            held = self._drop_oldest(held)
        self.recent_bytes = held

    def _drop_oldest(self, held: int) -> int:
        """Drop the oldest of `recent` (holding `held` bytes) beyond RECENT_BYTES, keeping
        at least one record; the bytes it then holds."""
        recent = self.recent
        while len(recent) > 1 and held - len(recent[0].data) >= RECENT_BYTES:
            held -= len(recent.popleft().data)
        return held

    def forget(self) -> None:
        """The stream's data was dropped or replaced: nothing read of it before may be
        served again."""
        self.recent.clear()
        self.recent_bytes = 0
        self.incarnation = next(_incarnations)

    def recent_from(self, position: int, max_bytes: int) -> list[Record] | None:
        """Records with end > position from memory, or None if memory does not cover it."""
        recent = self.recent
        if not recent or position < recent[0].start:
            return None
        # From the newest back: a live reader wants the last few of thousands.
        newer: list[Record] = []
        for record in reversed(recent):
            if record.end <= position:
                break
            newer.append(record)
        newer.reverse()
        out: list[Record] = []
        total = 0
        for record in newer:
            out.append(record)
            total += len(record.data)
            if total >= max_bytes:
                break
        return out


class StreamTable:
    """Entries by path, loaded from the store on first use. Entries of absent streams are
    dropped when their request ends; beyond `max_entries` the least recently used idle
    entries are dropped too (their state is all in the database).

    The table refuses requests (`StorageUnavailable`) until `start_serving`: the service
    first recovers what its database says must happen at start-up (fork intents, alarms),
    and a shard whose database could not be opened serves 503s until then."""

    def __init__(self, store: Store, max_entries: int = MAX_CACHED_ENTRIES) -> None:
        self._store = store
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._max_entries = max_entries
        self._next_sid: int | None = None  # read from the store at the first new stream
        self._serving = False
        self._slices = SliceCache()

    def start_serving(self) -> None:
        self._serving = True

    def get(self, path: str) -> Entry:
        if not self._serving:
            raise StorageUnavailable(self._store.failure or "the shard is starting")
        entries = self._entries
        entry = entries.get(path)
        if entry is not None:
            entries.move_to_end(path)
            return entry
        entry = Entry(path)
        loaded = self._store.load_stream(path)
        if loaded is not None:
            sid, state = loaded
            entry.committed = entry.pending = state
            entry.committed_sid = entry.pending_sid = sid
        entries[path] = entry
        if len(entries) > self._max_entries:
            self._evict()
        return entry

    def _evict(self) -> None:
        entries = self._entries
        excess = len(entries) - self._max_entries
        for path in list(itertools.islice(entries, excess * 2)):
            if excess <= 0:
                break
            if entries[path].idle():
                del entries[path]
                excess -= 1

    def live_entries(self) -> list[Entry]:
        """Entries with live readers parked on them (to wake when the ring changes)."""
        return [entry for entry in self._entries.values() if entry.waiters]

    def release_if_idle(self, entry: Entry) -> None:
        if entry.absent() and self._entries.get(entry.path) is entry:
            del self._entries[entry.path]

    def new_sid(self) -> int:
        sid = self._next_sid
        if sid is None:
            sid = self._store.max_sid() + 1
        self._next_sid = sid + 1
        return sid

    def read(self, entry: Entry, position: int, max_bytes: int) -> list[Record]:
        """Committed records with end > position (at most up to the committed tail)."""
        return self.read_named(entry, position, max_bytes)[0]

    def read_named(self, entry: Entry, position: int, max_bytes: int) -> tuple[list[Record], bytes]:
        """`read`'s records, and the body token (`slice_cache.body_token`) of the first
        one's data when they are one raw slice joined from disk, of the slice cache's
        sizes, read while the storage is sound (b"" otherwise)."""
        records = self.read_recent(entry, position, max_bytes)
        if records is not None:
            return records, b""
        # From disk only what the committed state describes (a commit in the worker
        # thread may be visible to the reader before the loop has taken it in). Raw
        # bytes come back as one record, joined once in C: a catch-up slice of small
        # records costs no Python step per record here or in the core.
        state = entry.committed if entry.committed_moved else entry.committed_base
        sid = entry.committed_sid
        assert state is not None and sid is not None  # (else read_recent answered [])
        tail = state.tail
        if is_json(state.content_type):
            return self._store.read_records(sid, position, max_bytes, below=tail), b""
        return self._read_joined(entry.incarnation, sid, position, max_bytes, tail)

    @staticmethod
    def read_recent(entry: Entry, position: int, max_bytes: int) -> list[Record] | None:
        """`read`'s records when they are in memory (the recent tail: a live reader's
        next records, just committed), else None (`read` takes them from disk)."""
        state = entry.committed if entry.committed_moved else entry.committed_base
        if state is None or entry.committed_sid is None or position >= state.tail:
            return []
        records = entry.recent_from(position, max_bytes)
        if records:
            tail = state.tail
            if records[-1].end > tail:
                records = [r for r in records if r.end <= tail]
        return records

    def _read_joined(
        self, incarnation: int, sid: int, position: int, max_bytes: int, tail: int
    ) -> tuple[list[Record], bytes]:
        """Raw data from disk as one record, from the slice cache when it holds it (not
        while the storage has failed: such a read goes to the database, as before, and
        is given no token), with its token."""
        store = self._store
        key = (incarnation, sid, position, max_bytes)
        generation = store.generation
        sound = store.failure is None
        if sound:
            cached = self._slices.get(key, tail)
            if cached is not None:
                return [cached], body_token(generation, key, len(cached.data))
        joined = store.read_joined(sid, position, max_bytes, below=tail)
        if joined is None:
            return [], b""
        self._slices.put(key, tail, joined)
        size = len(joined.data)
        # (the store's generation read before the read: a reopen during it names no token)
        if sound and size >= MIN_SLICE_BYTES and store.generation == generation:
            return [joined], body_token(generation, key, size)
        return [joined], b""
