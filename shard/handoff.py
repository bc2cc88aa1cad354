"""Moving streams between shards when the ring changes: both ends, and the gate between.

When a shard adopts a ring under which it no longer owns some of its streams, it hands
each to its new owner (`Sender`); the new owner stages what arrives and commits the
stream whole before it serves it (`Receiver`). Rules, and how they are kept:

* **Never two writers.** The old owner stops writing a stream the moment it adopts the
  ring that takes it away: the committer refuses every write on it (`fenced`), live
  readers are woken and leave with `moving`, the RPC server answers `misdirected`.
  Writes already queued commit first (`wait_settled`); then the records are read, and
  they can no longer change.
* **Chunked, throttled, resumable.** Records go in `move_chunk` frames of about
  CHUNK_BYTES, each committed by the new owner (staged under a stream id of its own, in
  `arrivals`) before the next is read, a few streams at a time: memory stays bounded
  and the loop is held for one slice read at a time. `move_begin` tells the sender how
  far a stream already arrived, so either side may be killed at any moment and the
  move resumes where the new owner's database says it got to.
* **Committed whole, then served, then dropped.** `move_finish` carries the stream's
  state (offsets, producers, closure, TTL and Expires-At, soft deletion, fork origin),
  its fork references and the end of its records; the new owner writes the stream's row
  in one transaction with the staged records and an `arrived` mark. Only then does the
  old owner delete its copy; a sender retrying after a crash is told the stream is
  already there (`arrived`), so an import happens once.
* **Nothing served before it arrives.** The new owner answers a path it gained with
  `moving` while the stream is staged, and for a path it does not hold it asks the
  shards that may still hold one (`ShardRing.sources`) whether they do (`move_query`,
  which also puts that stream first in their queue). Only when none does is the path
  served (a PUT may then create it): a request waits for one stream, not for the move.
  A shard answers such a question, and accepts an arriving stream, only under the
  asker's ring or a newer one, so no stream can slip past between the question and the
  answer. Shards that hold nothing more for us are dropped from the sources.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ds_cluster.common import wire
from ds_cluster.common.backoff import jittered
from ds_cluster.common.ring import Ring, RingHolder
from ds_cluster.shard.committer import Committer, Job, StreamMoving
from ds_cluster.shard.core.bodies import MAX_RECORD_BYTES
from ds_cluster.shard.core.model import ProducerState, Record, StreamState
from ds_cluster.shard.peers import PeerUnavailable, records_from_wire, records_to_wire
from ds_cluster.shard.ring_state import ShardRing
from ds_cluster.shard.store import (
    Arrival,
    StorageUnavailable,
    Store,
    StreamWrite,
    decode_state,
    depart,
    departed,
    drop_arrival,
    encode_state,
    finish_arrival,
    purge_slice,
    stage_arrival,
    stage_records,
)
from ds_cluster.shard.streams import Entry, StreamTable

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024  # record bytes per move_chunk frame (one record may exceed it)
SLICE_BYTES = 256 * 1024  # record bytes read from SQLite on the loop at a time
SENDERS = 3  # streams sent at once in the background
URGENT_SENDERS = 8  # and beside them, streams a request waits for on their new owner
PURGE_SLICE_RECORDS = 32  # records deleted per transaction when a sent copy is dropped
MOVE_TIMEOUT = 30.0  # seconds for one move RPC
QUERY_TIMEOUT = 2.0  # seconds a source has to say whether it holds a path
ARRIVAL_WAIT = 1.0  # a request for a stream on its way waits this long, then `moving`
SCAN_SLICE = 500  # streams looked at per read when finding those to send
RETRY_MIN, RETRY_MAX = 0.1, 2.0  # backoff after a failed move or source query
PUSH_ATTEMPTS = 30  # a shard that cannot be told of a new ring this many times is left
SETTLED_MAX = 100_000  # paths known to be held by no source, remembered

Call = Callable[[str, str, wire.Args, float], Awaitable[wire.Args]]  # (shard, op, args, timeout)


class MoveFailed(Exception):
    """A move step failed; the stream stays here and is tried again later."""


@dataclass
class Outgoing:
    """A stream to hand over, and about how many bytes are still to send."""

    left: int


class Handoff:
    """Both ends of stream moves on one shard, and the gate on its requests."""

    def __init__(
        self,
        ring: ShardRing,
        store: Store,
        committer: Committer,
        table: StreamTable,
        call: Call,
        *,
        releases: Callable[[], int] = lambda: 0,
        heard: RingHolder | None = None,
    ) -> None:
        """`releases`: how many fork releases this shard has still to deliver (a shard
        that leaves the ring is done only once they are); `heard`: rings this shard's
        RPC client learned from its peers' answers, adopted here too."""
        self.ring = ring
        self.me = ring.shard_id
        self._store = store
        self._committer = committer
        self._table = table
        self._call = call
        self._releases = releases
        self._heard = heard
        # -- sending
        self._outgoing: OrderedDict[str, Outgoing] = OrderedDict()
        self._urgent: list[str] = []
        self._urgent_sending = 0
        self._nursery: trio.Nursery | None = None
        self._active: set[str] = set()
        self._work = trio.Event()
        self._scanned = -1  # the ring version whose streams have all been looked at
        self._rescan = trio.Event()
        self.sent_streams = 0
        self.sent_bytes = 0
        # -- receiving
        self._staging: dict[str, Arrival] = {}
        self._arrived: dict[str, trio.Event] = {}
        self._settled: set[str] = set()
        self._asking: dict[str, trio.Event] = {}
        self._sources_changed = trio.Event()
        self._locks: dict[str, trio.Lock] = {}
        # -- telling the other shards of a new ring
        self._push_to: dict[str, int] = {}  # shard id -> attempts so far
        self._push = trio.Event()
        # Other items this shard still holds for a shard (None: for any other), -1 if
        # it cannot tell yet: subscriptions (`shard.subscriptions.move`).
        self.held_items: Callable[[str | None], int] = lambda asker: 0
        ring.on_change.append(self._ring_changed)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover staged arrivals, then scan, send and prune sources until cancelled."""
        for arrival in self._store.load_arrivals():
            self._staging[arrival.path] = arrival
        self._rescan.set()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._scan_loop)
            for _ in range(SENDERS):
                nursery.start_soon(self._send_loop)
            nursery.start_soon(self._prune_loop)
            nursery.start_soon(self._push_loop)
            if self._heard is not None:
                nursery.start_soon(self._follow_heard, self._heard)
            task_status.started()

    async def _follow_heard(self, heard: RingHolder) -> None:
        """Adopt a newer ring that a peer's answer taught our RPC client."""
        while True:
            ring = await heard.wait_newer(self.ring.current.version)
            try:
                await self.ring.adopt(ring)
            except StorageUnavailable as exc:
                log.warning("cannot adopt ring v%d now: %s", ring.version, exc)
                await trio.sleep(RETRY_MAX)

    def fenced(self, path: str) -> bool:
        """Whether requests may not write `path` now: gone to another owner, or arriving."""
        return not self.ring.current.owns(self.me, path) or path in self._staging

    def _ring_changed(self, old: Ring, new: Ring) -> None:
        for shard_id in (*old.shard_ids, *new.shard_ids):
            if shard_id != self.me:
                self._push_to[shard_id] = 0
        self._push.set()
        self._settled.clear()
        self._scanned = -1
        self._rescan.set()
        self._sources_changed.set()
        for entry in self._table.live_entries():
            if not new.owns(self.me, entry.path):
                entry.notify()  # live readers see the fence and leave with `moving`

    def after_commit(self, path: str, write: StreamWrite, ring: Ring) -> None:
        """A stream was written: one this shard no longer owns (an arrival under an older
        ring) is sent on; a deleted one no longer needs sending. `ring` is the current
        ring, read once per commit by the caller (a commit writes many streams)."""
        if write.state is None:
            self._outgoing.pop(path, None)
        elif ring.owner(path) != self.me and path not in self._outgoing:
            self._outgoing[path] = Outgoing(write.tail())
            self._work.set()

    # -- the gate: may this shard serve `path` now? --------------------------------------------

    def admits_now(self, path: str) -> bool:
        """Whether `admit(path)` would return at once, without a wait or a query: the
        request may then be decided on the spot (`ShardService.decide_now`)."""
        return path not in self._staging and (not self.ring.sources or path in self._settled)

    async def admit(self, path: str) -> None:
        """Return if this shard may serve `path` (it owns it); raise StreamMoving while the
        stream is arriving or may still be held by a shard it came from."""
        if path in self._staging:
            await self._wait_arrival(path)
        if not self.ring.sources or path in self._settled:
            return
        if self._store.has_stream(path):
            return
        asking = self._asking.get(path)
        if asking is not None:
            with trio.move_on_after(QUERY_TIMEOUT + ARRIVAL_WAIT):
                await asking.wait()
            if path in self._settled or self._store.has_stream(path):
                return
            raise StreamMoving(path)
        asking = self._asking[path] = trio.Event()
        try:
            held = await self._ask_sources(path)
        finally:
            del self._asking[path]
            asking.set()
        if held:
            await self._wait_arrival(path)
            return
        if len(self._settled) >= SETTLED_MAX:
            self._settled.clear()
        self._settled.add(path)

    async def _wait_arrival(self, path: str) -> None:
        """Wait briefly for `path` to arrive; StreamMoving if it does not."""
        if path not in self._staging and self._store.has_stream(path):
            return  # it arrived while we asked
        event = self._arrived.setdefault(path, trio.Event())
        with trio.move_on_after(ARRIVAL_WAIT):
            await event.wait()
        if path in self._staging or not self._store.has_stream(path):
            if self._arrived.get(path) is event and not event.is_set():
                del self._arrived[path]  # the next request waits on a fresh one
            raise StreamMoving(path)

    async def _ask_sources(self, path: str) -> bool:
        """Whether any source holds or is receiving `path` (it then sends it first).
        StreamMoving if one cannot tell now."""
        sources = [sid for sid in self.ring.sources if sid != self.me]
        answers: dict[str, bool | None] = {}
        args: wire.Args = {"ring": self.ring.current.to_wire(), "from": self.me, "path": path}

        async def ask(shard_id: str) -> None:
            try:
                result = await self._call(shard_id, "move_query", dict(args), QUERY_TIMEOUT)
                answers[shard_id] = bool(result.get("have"))
                await self._newer(result.get("ring"))
            except PeerUnavailable as exc:
                log.info("cannot ask %s about %r: %s", shard_id, path, exc)
                answers[shard_id] = None

        async with trio.open_nursery() as nursery:
            for shard_id in sources:
                nursery.start_soon(ask, shard_id)
        if any(answers.values()):
            return True
        if any(answer is None for answer in answers.values()):
            raise StreamMoving(path)
        return False

    # -- ops (rpc_ops): adopting the caller's ring first ---------------------------------------

    async def take_ring(self, info: object) -> Ring:
        """The ring a peer sent, adopted if it is newer (BadArguments if it is no ring)."""
        try:
            ring = Ring.from_wire(info)
        except ValueError as exc:
            raise wire.BadArguments(f"bad ring: {exc}") from None
        await self.ring.adopt(ring)
        return ring

    async def _newer(self, info: object) -> None:
        """A peer answered with its ring: adopt it if it is newer (a malformed one is
        that peer's problem, not ours)."""
        if isinstance(info, dict) and info.get("version", -1) > self.ring.current.version:
            try:
                await self.take_ring(info)
            except (wire.BadArguments, StorageUnavailable) as exc:
                log.warning("not adopting a peer's ring: %s", exc)

    def _owned(self, path: str) -> None:
        ring = self.ring.current
        if not ring.owns(self.me, path):
            raise wire.Misdirected(f"not the owner of {path[:100]!r} under ring v{ring.version}")

    async def query(self, asker: str, path: str | None, version: int | None = None) -> wire.Args:
        """`move_query`: do we hold `path` (and send it first), or hold anything for
        `asker` at all? With `version`: did `path` arrive whole from `asker` under it?"""
        if path is not None and version is not None:
            return {"arrived": self._store.load_arrived(path) == (asker, version)}
        if path is not None:
            have = path in self._staging or self._store.has_stream(path)
            if have and not self.ring.current.owns(self.me, path):
                self._hurry(path)
            return {"have": have, "ring": self.ring.current.to_wire()}
        ring = self.ring.current
        if self._scanned != ring.version:
            holding = -1
        else:
            holding = sum(1 for p in self._outgoing if ring.owner(p) == asker)
        items = self.held_items(asker)
        holding = -1 if items < 0 or holding < 0 else holding + items
        return {"holding": holding, "receiving": len(self._staging), "ring": ring.to_wire()}

    def _lock(self, path: str) -> trio.Lock:
        lock = self._locks.get(path)
        if lock is None:
            lock = self._locks[path] = trio.Lock()
        return lock

    async def begin(self, source: str, version: int, path: str) -> wire.Args:
        """`move_begin`: get ready to receive `path` from `source`; say how far it got."""
        async with self._lock(path):
            self._owned(path)
            staged = self._staging.get(path)
            arrived = self._store.load_arrived(path)
            here = self._store.has_stream(path)
            if (
                staged is None
                and arrived is not None
                and arrived[0] == source
                and (arrived[1] == version or here)
            ):
                return {"status": "done"}  # it arrived before (the sender was restarted)
            if staged is not None:
                if staged.source == source:
                    if staged.received:
                        log.info("resuming %r from %s at %d", path, source, staged.received)
                    return {"status": "staging", "received": staged.received}
                raise StreamMoving(path)  # another shard is sending it (an older ring's move)
            entry = self._table.get(path)
            try:
                if here or entry.pending is not None:
                    log.error("%r arrives from %s but this shard already holds it", path, source)
                    return {"status": "conflict"}
                arrival = Arrival(path, source, version, self._table.new_sid(), 0)
                job = Job(statements=[stage_arrival(path, source, version, arrival.sid)])
                await self._committer.submit(job).wait()
                self._staging[path] = arrival
                return {"status": "staging", "received": 0}
            finally:
                self._table.release_if_idle(entry)

    async def chunk(self, source: str, path: str, records: list[Record]) -> wire.Args:
        """`move_chunk`: stage the next records of `path` (those already here are skipped)."""
        async with self._lock(path):
            staged = self._staging.get(path)
            if staged is None or staged.source != source:
                raise wire.BadArguments(f"{path[:100]!r} is not being received from {source}")
            fresh = [r for r in records if r.end > staged.received]
            if fresh and fresh[0].start < staged.received:
                raise wire.BadArguments("move_chunk records overlap what has arrived")
            if fresh:
                received = fresh[-1].end
                job = Job(
                    statements=stage_records(path, staged.sid, fresh, received),
                    extra_bytes=sum(len(r.data) for r in fresh),
                )
                await self._committer.submit(job).wait()
                staged = self._staging[path] = Arrival(
                    path, source, staged.version, staged.sid, received
                )
            return {"received": staged.received}

    async def finish(
        self,
        source: str,
        version: int,
        path: str,
        state: StreamState,
        refs: list[str],
        end: int,
    ) -> wire.Args:
        """`move_finish`: the whole of `path` is here; commit it and serve it from now on."""
        async with self._lock(path):
            staged = self._staging.get(path)
            if staged is None:
                arrived = self._store.load_arrived(path)
                if arrived is not None and arrived[0] == source:
                    return {"status": "done"}
                raise wire.BadArguments(f"{path[:100]!r} is not being received")
            if staged.source != source:
                raise StreamMoving(path)
            if staged.received != end:
                # The sender's view of what arrived is off (it was restarted): start over.
                await self._committer.submit(
                    Job(statements=drop_arrival(path, staged.sid), unfenced=True)
                ).wait()
                del self._staging[path]
                raise wire.BadArguments(f"{path[:100]!r}: {staged.received} arrived, not {end}")
            self._owned(path)
            entry = self._table.get(path)
            try:
                write = StreamWrite(path, staged.sid, None, state, (), {})
                job = Job(
                    writes=[(entry, write)],
                    refs_added=[(ref, path) for ref in refs],
                    statements=finish_arrival(path, source, version),
                    unfenced=True,
                )
                await self._committer.submit(job).wait()
            finally:
                self._table.release_if_idle(entry)
            del self._staging[path]
            event = self._arrived.pop(path, None)
            if event is not None:
                event.set()
            log.debug("received %r from %s", path, source)
        lock = self._locks.get(path)
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            del self._locks[path]  # nobody else is on this path: forget its lock
        return {"status": "done"}

    def status(self) -> wire.Args:
        """`move_status`: what is left to send and to receive under the newest ring."""
        streams, nbytes = self._store.counts()
        ring = self.ring.current
        scanned = self._scanned == ring.version
        releases = self._releases()
        leaving = self.me not in ring.shard_ids
        # Done also means no other shard may still hold a stream of ours: a source must
        # not be stopped (a shard leaving the ring) before we have stopped asking it.
        sources = sorted(sid for sid in self.ring.sources if sid != self.me)
        items = self.held_items(None)
        done = scanned and not self._outgoing and not self._staging and not sources
        done = done and items == 0
        done = done and not (leaving and releases)
        return {
            "ring": ring.to_wire(),
            "streams": streams,
            "bytes": nbytes,
            "moving_out": {
                "streams": len(self._outgoing),
                "bytes": sum(out.left for out in self._outgoing.values()),
            },
            "moved_out": {"streams": self.sent_streams, "bytes": self.sent_bytes},
            "pending_in": len(self._staging),
            "subscriptions_out": items,
            "pending_releases": releases,
            "sources": sources,
            "scanned": scanned,
            "done": done,
        }

    # -- sending -------------------------------------------------------------------------------

    async def _scan_loop(self) -> None:
        """Find the streams this shard holds and no longer owns, after each ring change."""
        while True:
            await self._rescan.wait()
            self._rescan = trio.Event()
            version = self.ring.current.version
            await self._discard_strays()
            after = ""
            while not self._rescan.is_set():
                try:
                    rows = self._store.paths_after(after, SCAN_SLICE)
                except StorageUnavailable as exc:
                    log.warning("cannot look for streams to move: %s", exc)
                    await trio.sleep(RETRY_MAX)
                    continue
                ring = self.ring.current
                for path, tail in rows:
                    if not ring.owns(self.me, path) and path not in self._outgoing:
                        self._outgoing[path] = Outgoing(tail)
                if rows:
                    self._work.set()
                if len(rows) < SCAN_SLICE:
                    if self.ring.current.version == version:
                        self._scanned = version
                        if self._outgoing:
                            log.info(
                                "ring v%d: %d streams to hand over", version, len(self._outgoing)
                            )
                    break
                after = rows[-1][0]
                await trio.sleep(0)

    async def _discard_strays(self) -> None:
        """Half-received streams this shard no longer owns are discarded (never served):
        their sender keeps them and sends them to their owner under the new ring."""
        ring = self.ring.current
        for path in [p for p in self._staging if not ring.owns(self.me, p)]:
            async with self._lock(path):
                staged = self._staging.get(path)
                if staged is None or ring.owns(self.me, path):
                    continue
                try:
                    job = Job(statements=drop_arrival(path, staged.sid), unfenced=True)
                    await self._committer.submit(job).wait()
                except StorageUnavailable as exc:
                    log.warning("cannot discard the arrival of %r: %s", path, exc)
                    continue
                del self._staging[path]
                log.info("discarded the half-received %r (ring v%d)", path, ring.version)

    def _take(self) -> str | None:
        while self._urgent:
            path = self._urgent.pop(0)
            if path in self._outgoing and path not in self._active:
                return path
        for path in self._outgoing:
            if path not in self._active:
                return path
        return None

    def _hurry(self, path: str) -> None:
        """A request waits for `path` on its new owner: send it now, beside the streams
        being sent (which may be large), or else next."""
        self._outgoing.setdefault(path, Outgoing(0))
        if path in self._active:
            return
        if self._nursery is not None and self._urgent_sending < URGENT_SENDERS:
            self._active.add(path)
            self._urgent_sending += 1
            self._nursery.start_soon(self._send_now, path)
        elif path not in self._urgent:
            self._urgent.append(path)
            self._work.set()

    async def _send_now(self, path: str) -> None:
        try:
            await self._send(path)
        except (MoveFailed, PeerUnavailable, StorageUnavailable, wire.OpError) as exc:
            log.info("moving %r deferred: %s", path, exc)  # the senders try it again
            self._work.set()
        finally:
            self._active.discard(path)
            self._urgent_sending -= 1

    async def _send_loop(self) -> None:
        backoff = RETRY_MIN
        while True:
            path = self._take()
            if path is None:
                await self._work.wait()
                self._work = trio.Event()
                continue
            self._active.add(path)
            try:
                await self._send(path)
                backoff = RETRY_MIN
            except (MoveFailed, PeerUnavailable, StorageUnavailable, wire.OpError) as exc:
                log.info("moving %r deferred: %s", path, exc)
                if path in self._outgoing:
                    self._outgoing.move_to_end(path)  # the others first
                await trio.sleep(jittered(backoff))
                backoff = min(backoff * 2, RETRY_MAX)
            finally:
                self._active.discard(path)

    async def _send(self, path: str) -> None:
        """Hand `path` to its owner under our ring, then drop our copy."""
        ring = self.ring.current
        target = ring.owner(path)
        if target == self.me:
            self._outgoing.pop(path, None)  # the ring came back to us meanwhile
            return
        entry = self._table.get(path)
        try:
            await entry.wait_settled()
            entry.notify()  # live readers leave with `moving`
            state, sid = entry.committed, entry.committed_sid
            if state is None or sid is None:
                self._outgoing.pop(path, None)
                return
            base: wire.Args = {"ring": ring.to_wire(), "from": self.me, "path": path}
            if await self._arrived_elsewhere(path, target, base):
                await self._drop(entry, sid)  # its last owner has it: ours is stale
                return
            answer = await self._move_call(target, "move_begin", base)
            status = answer.get("status")
            sent = 0
            if status == "staging":
                position = answer.get("received")
                if type(position) is not int or position < 0:
                    raise MoveFailed(f"bad move_begin answer from {target}")
                while True:
                    records = await self._read(sid, position)
                    if not records:
                        break
                    answer = await self._move_call(
                        target, "move_chunk", {**base, **records_to_wire(records)}
                    )
                    received = answer.get("received")
                    if type(received) is not int or received != records[-1].end:
                        raise MoveFailed(f"{target} staged {path!r} to {received!r}")
                    size = sum(len(r.data) for r in records)
                    sent += size
                    self.sent_bytes += size
                    out = self._outgoing.get(path)
                    if out is not None:
                        out.left = max(0, out.left - size)
                    position = received
                state = entry.committed  # the newest (a read may have refreshed its TTL)
                if state is None:
                    raise MoveFailed(f"{path!r} vanished while it was sent")
                producers = [[p, s.epoch, s.last_seq] for p, s in state.producers.items()]
                finish = {
                    **base,
                    "state": encode_state(state),
                    "producers": producers,
                    "refs": self._store.refs_on(path),
                    "end": position,
                }
                await self._committer.submit(
                    Job(statements=[depart(path, target, ring.version)], unfenced=True)
                ).wait()
                answer = await self._move_call(target, "move_finish", finish)
                status = answer.get("status")
            if status != "done":
                raise MoveFailed(f"{target} answered {status!r} for {path!r}")
            await self._drop(entry, sid)
            self.sent_streams += 1
            log.debug("handed %r (%d bytes) to %s", path, sent, target)
        finally:
            self._table.release_if_idle(entry)

    async def _arrived_elsewhere(self, path: str, target: str, base: wire.Args) -> bool:
        """Whether `path` was committed by the shard we sent it to under an older ring
        (we were killed before deleting our copy, and the ring changed since): then
        that shard has it, and ours must not be sent anywhere."""
        departure = self._store.load_departure(path)
        if departure is None or departure[0] == target:
            return False
        earlier, version = departure
        answer = await self._call(
            earlier, "move_query", {**base, "version": version}, QUERY_TIMEOUT
        )
        return bool(answer.get("arrived"))

    async def _read(self, sid: int, position: int) -> list[Record]:
        """The next chunk's records after `position`, read in slices with the loop let go
        in between (a slice is a millisecond or two of SQLite)."""
        records: list[Record] = []
        size = 0
        while size < CHUNK_BYTES:
            if records:
                await trio.sleep(0)
            more = self._store.read_records(sid, position, SLICE_BYTES)
            if not more:
                break
            records += more
            size += sum(len(r.data) for r in more)
            position = more[-1].end
        return records

    async def _drop(self, entry: Entry, sid: int) -> None:
        """The new owner has the stream: delete our copy (its references went with it).

        A large copy's records go first, a slice per transaction (in a worker thread):
        one transaction deleting 50 MiB would hold every other write of this shard
        behind it for seconds. Nothing reads them meanwhile (the stream is fenced), and
        if we are killed halfway the new owner's `arrived` mark says the stream is there."""
        await entry.wait_settled()
        while self._store.count_records(sid, PURGE_SLICE_RECORDS + 1) > PURGE_SLICE_RECORDS:
            job = Job(
                statements=[purge_slice(sid, PURGE_SLICE_RECORDS)],
                extra_bytes=PURGE_SLICE_RECORDS * MAX_RECORD_BYTES,  # off the loop
                unfenced=True,
            )
            await self._committer.submit(job).wait()
        refs = self._store.refs_on(entry.path)
        write = StreamWrite(entry.path, sid, sid, None)
        job = Job(
            writes=[(entry, write)],
            refs_removed=refs,
            statements=[departed(entry.path)],
            unfenced=True,
        )
        await self._committer.submit(job).wait()
        self._outgoing.pop(entry.path, None)

    async def _move_call(self, target: str, op: str, args: wire.Args) -> wire.Args:
        """One move RPC. A target that says it does not own the path may be on a newer
        ring: take it (`ring_get`) and let the stream be tried again."""
        try:
            return await self._call(target, op, args, MOVE_TIMEOUT)
        except PeerUnavailable as exc:
            if "misdirected" in str(exc):
                try:
                    info = await self._call(target, "ring_get", {}, QUERY_TIMEOUT)
                    await self.take_ring(info.get("ring"))
                except (PeerUnavailable, wire.BadArguments):
                    pass
            raise

    # -- telling the others -----------------------------------------------------------------------

    async def _push_loop(self) -> None:
        """Send each newly adopted ring to the other shards of the old and the new ring
        (they adopt it if it is newer), until each has it or PUSH_ATTEMPTS fail."""
        while True:
            if not self._push_to:
                await self._push.wait()
                self._push = trio.Event()
                continue
            ring = self.ring.current
            args: wire.Args = {"ring": ring.to_wire()}
            failed = 0
            for shard_id, attempts in list(self._push_to.items()):
                try:
                    answer = await self._call(shard_id, "ring_set", dict(args), QUERY_TIMEOUT)
                    theirs = answer.get("ring")
                    if isinstance(theirs, dict) and theirs.get("version", 0) > ring.version:
                        await self.take_ring(theirs)
                    self._push_to.pop(shard_id, None)
                except (PeerUnavailable, wire.BadArguments, StorageUnavailable) as exc:
                    failed = attempts + 1
                    if failed >= PUSH_ATTEMPTS:
                        log.warning(
                            "could not send ring v%d to %s: %s", ring.version, shard_id, exc
                        )
                        self._push_to.pop(shard_id, None)
                    else:
                        self._push_to[shard_id] = failed
            if failed:
                with trio.move_on_after(jittered(RETRY_MAX)):
                    await self._push.wait()
                self._push = trio.Event()

    # -- sources ---------------------------------------------------------------------------------

    async def _prune_loop(self) -> None:
        """Ask each source whether it still holds anything for us (or is receiving
        anything); drop those that do not. Paced: these are other processes' states."""
        backoff = RETRY_MIN
        while True:
            sources = [sid for sid in self.ring.sources if sid != self.me]
            if not sources:
                await self._sources_changed.wait()
                self._sources_changed = trio.Event()
                continue
            args: wire.Args = {"ring": self.ring.current.to_wire(), "from": self.me}
            for shard_id in sources:
                try:
                    answer = await self._call(shard_id, "move_query", dict(args), QUERY_TIMEOUT)
                    await self._newer(answer.get("ring"))
                except PeerUnavailable as exc:
                    log.debug("source %s: %s", shard_id, exc)
                    continue
                if answer.get("holding") == 0 and answer.get("receiving") == 0:
                    with contextlib.suppress(StorageUnavailable):
                        await self.ring.drop_source(shard_id)
            backoff = min(backoff * 2, RETRY_MAX)
            with trio.move_on_after(jittered(backoff)):
                await self._sources_changed.wait()
                backoff = RETRY_MIN  # a new ring: its moves are just starting
            self._sources_changed = trio.Event()


def state_from_wire(path: str, args: wire.Args) -> tuple[StreamState, list[str], int]:
    """A `move_finish`'s stream state, fork references and end, checked."""
    blob, producers, refs, end = (
        args.get("state"),
        args.get("producers"),
        args.get("refs"),
        args.get("end"),
    )
    if not (
        isinstance(blob, bytes)
        and isinstance(producers, list)
        and isinstance(refs, list)
        and all(isinstance(r, str) for r in refs)
        and type(end) is int
        and end >= 0
    ):
        raise wire.BadArguments("malformed move_finish arguments")
    table: dict[str, ProducerState] = {}
    for item in producers:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and type(item[1]) is int
            and type(item[2]) is int
        ):
            raise wire.BadArguments("malformed move_finish producer")
        table[item[0]] = ProducerState(item[1], item[2])
    try:
        state = decode_state(path, blob, table)
    except Exception as exc:  # a peer's bytes: any decoding failure is a bad argument
        raise wire.BadArguments(f"undecodable stream state: {exc}") from None
    if not isinstance(state.tail, int) or not isinstance(state.content_type, str):
        raise wire.BadArguments("malformed stream state")
    return state, list(refs), end


def chunk_from_wire(args: wire.Args) -> list[Record]:
    try:
        return records_from_wire(args)
    except PeerUnavailable as exc:
        raise wire.BadArguments(str(exc)) from None
