"""The shard runtime: runs the sans-IO core against the store, the hub and the alarms.

`ShardService` turns core decisions into I/O: it persists Replies through the group
committer (acknowledging only after commit), feeds records to reads, parks long-polls
(`shard.polls`) and SSE sessions (`shard.live_sse`) on their stream, to be served by the
commit that moves it, and expires streams from the alarm loop. Forks
(creating them, serving their sources, reading through them) are `shard.forks`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import trio

from ds_cluster.common import wire
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import ShardPool
from ds_cluster.shard import core
from ds_cluster.shard.alarms import AlarmLoop
from ds_cluster.shard.committer import Committer, Job, StorageUnavailable, StreamMoving
from ds_cluster.shard.core.errors import unavailable
from ds_cluster.shard.core.model import (
    CoreConfig,
    LiveSession,
    NeedBody,
    NeedRecords,
    NeedSource,
    Record,
    Reply,
    Request,
    Response,
    StartSse,
    StreamState,
    Wait,
)
from ds_cluster.shard.forks import ForkCoordinator
from ds_cluster.shard.handoff import Handoff
from ds_cluster.shard.live_sse import LiveSink, ParkedSse
from ds_cluster.shard.metrics import ShardCounters, count_stored_streams
from ds_cluster.shard.offload import BodyOffload
from ds_cluster.shard.peers import PeerUnavailable, call_peer
from ds_cluster.shard.polls import Answer, ParkedPoll, PollTimer
from ds_cluster.shard.ring_state import ShardRing
from ds_cluster.shard.store import (
    NOTICE_STATUS,
    Store,
    StreamWrite,
    append_write,
)
from ds_cluster.shard.streams import Entry, StreamTable
from ds_cluster.shard.subscriptions import Subscriptions
from ds_cluster.shard.subscriptions.move import SubMover

log = logging.getLogger(__name__)

Respond = Callable[[Response, bool], Awaitable[None]]  # (head, more body follows)
SendChunk = Callable[[bytes, bool], Awaitable[None]]  # (body bytes, more follows)


# An append decided by `ShardService.decide_now`, its job queued for commit: (its
# stream's entry, the job, the core's reply); once the job's `done` is set,
# `ShardService.settled` gives its response. A tuple, not a class: every append makes
# one, and a class's `__init__` cost about 1.8k instructions, a tuple about a tenth.
Settling = tuple[Entry, Job, Reply]
# A plain append decided by `ShardService.append_now`, its job queued: (its stream's
# entry, the job, its one record, the Stream-Next-Offset of its 204); once the job's
# `done` is set, `ShardService.settled_append` gives its answer.
Appended = tuple[Entry, Job, Record, str]


class ShardService:
    def __init__(
        self,
        shard_id: str,
        rings: ShardRing,
        store: Store,
        config: CoreConfig,
        pool: ShardPool | None = None,
        secret: bytes = b"",
    ) -> None:
        """`secret`: the cluster secret, from which the webhook signing key and the
        subscription token key are derived (`shard.subscriptions.keys`)."""
        self.shard_id = shard_id
        self.rings = rings  # the newest ring, kept in the database (`shard.ring_state`)
        self.pool = pool
        self.store = store
        self.config = config
        self.table = StreamTable(store)
        self.counters = ShardCounters()  # for metrics (`shard.metrics`)
        self.committer = Committer(store, self._after_commit)
        self.poll_timer = PollTimer(self._poll_expired)
        self.alarms = AlarmLoop(self._expire)
        self.offload = BodyOffload()
        self.forks = ForkCoordinator(
            shard_id, rings.holder, store, self.committer, self.table, config, self._stage, pool
        )
        self.subs = Subscriptions(
            shard_id,
            lambda: self.ring,
            store,
            self.committer,
            self.table,
            secret,
            pool,
            self.handle_http,
        )
        # Streams moving in and out when the ring changes (`shard.handoff`).
        self.handoff = Handoff(
            rings,
            store,
            self.committer,
            self.table,
            self.call_peer,
            releases=lambda: self.forks.outbox.pending,
            heard=pool.rings if pool is not None else None,
        )
        self.committer.fenced = self.handoff.fenced
        # Subscriptions moving with the ring (`shard.subscriptions.move`).
        self.sub_mover = SubMover(rings, self.subs, self.call_peer)
        self.handoff.held_items = self.sub_mover.holding
        self.forks.admit = self.handoff.admit

    @property
    def ring(self) -> Ring:
        """The newest ring this shard has adopted."""
        return self.rings.current

    async def call_peer(self, shard_id: str, op: str, args: wire.Args, timeout: float) -> wire.Args:
        """An op on another shard (PeerUnavailable if it cannot answer or refuses)."""
        return await call_peer(self.pool, shard_id, op, args, timeout)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.committer.run)
            nursery.start_soon(self.poll_timer.run)
            if self.store.failure is not None:
                # The database cannot be opened yet: serve (503s; health says why) while
                # the committer keeps trying, and recover our state once it opens.
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
            nursery.start_soon(self.alarms.run)
            while True:
                await self.committer.wait_storage_ok()
                try:
                    await self.rings.start(self.committer)
                    for path, deadline in self.store.load_deadlines():
                        self.alarms.arm(path, deadline)
                    self.counters.streams = count_stored_streams(self.store)
                    await nursery.start(self.forks.run)
                    await nursery.start(self.handoff.run)
                    await nursery.start(self.subs.run)
                    break
                except StorageUnavailable as exc:  # failed again meanwhile: wait, retry
                    log.warning("recovering state at start-up failed: %s", exc)
                    await trio.sleep(0.1)
            self.table.start_serving()
            task_status.started()

    def health(self) -> dict[str, str]:
        """This shard's condition for its ping answer: anything but "ok" is a reason
        for readiness to report the shard (e.g. `{"storage": "failed: disk I/O error"}`)."""
        return {"storage": self.committer.health()}

    def owns(self, path: str) -> bool:
        return self.rings.holder.current.owner(path) == self.shard_id  # (every request asks)

    def _after_commit(self, jobs: list[Job]) -> None:
        counters = self.counters
        arm = self.alarms.arm
        handoff_after_commit = self.handoff.after_commit
        ring = self.rings.current  # (no await below: the ring cannot change in this loop)
        for job in jobs:
            for entry, write in job.writes:
                state = write.state
                if write.accessed is not None:
                    pass  # (a plain append: no row made or purged, no deadline)
                elif state is None:
                    if write.old_sid is not None:  # a row purged
                        counters.streams -= 1
                else:
                    if write.old_sid is None:  # a new row
                        counters.streams += 1
                    if state.ttl is not None or state.expires_at_ts is not None:
                        arm(entry.path, state.deadline())  # (None for all others)
                handoff_after_commit(entry.path, write, ring)
            for ref, source, status in job.outbox_put:
                if status == "due":
                    self.forks.outbox.add(ref, source)
                elif status == NOTICE_STATUS:
                    self.subs.notices.committed(ref, source)

    # -- HTTP requests -----------------------------------------------------------------------

    async def handle_http(
        self, request: Request, respond: Respond, send: SendChunk, sink: LiveSink | None = None
    ) -> None:
        """Serve `request`: `respond` sends the head (and a whole body), `send` the chunks
        of a streamed one. With `sink`, an SSE session at its stream's tail has its chunks
        pushed there by the commits that move the stream (`shard.live_sse`)."""
        if self.offload.engaged(request):  # a large body: the core may defer it
            await self.offload.run(request, lambda ready: self._handle(ready, respond, send, sink))
        else:
            await self._handle(request, respond, send, sink)

    def decide_now(self, request: Request) -> Response | Settling | None:
        """An append decided on the spot, without a task of its own: the response to send
        now (nothing to commit), a `Settling` whose response goes once its job is done
        (`settled`), or None when the request needs the full path (`handle_http`): not a
        POST, a large body, a stream moving or a decision that must wait. Raises what
        `handle_http` would raise (StorageUnavailable) before changing anything.

        `request` is on a path this shard owns under the current ring (the caller checked
        it, as `RpcServer._local_request` does, without waiting since): with
        `admits_now` (not arriving), its write is not fenced, and it is submitted without
        asking again."""
        path = request.path
        if (
            request.method != "POST"
            or self.offload.engaged(request)
            or not self.handoff.admits_now(path)
        ):
            return None
        entry = self.table.get(path)
        now = time.time()
        decision = core.handle(request, entry.pending, now, self.config)
        if type(decision) is not Reply:
            return None  # (the entry stays in the table: the full path takes it again)
        if not decision.changed:
            if decision.touch:
                self.committer.touch(entry, now)
            self.table.release_if_idle(entry)
            return decision.response
        job = self.committer.shared_job()
        write = self._stage(job, entry, decision.state, decision.records, fresh=decision.fresh)
        self.committer.admitted(entry, write)
        return (entry, job, decision)

    def append_now(self, path: str, headers: Mapping[str, str], body: bytes) -> Appended | None:
        """`decide_now` of a POST that is a plain append (`core.plain_append_parts`),
        given as its path, lower-case headers and body: no Request, Reply or Response is
        built for it. None when it is not that case, nothing changed: `decide_now` then
        decides the request. Raises StorageUnavailable as `decide_now` would, before
        changing anything; the caller checked what `decide_now` says of `path`."""
        content_type = core.plain_content_type(headers)
        if content_type is None:
            return None
        return self.append_typed(path, content_type, body)

    def append_typed(self, path: str, content_type: str, body: bytes) -> Appended | None:
        """`append_now` of a POST whose headers are its `content_type` alone (a shard
        link's `append` frame)."""
        if self.offload.engaged_write(path, body) or not self.handoff.admits_now(path):
            return None
        entry = self.table.get(path)
        state = entry.pending_base
        sid = entry.pending_sid
        if state is None or sid is None:
            return None  # (the entry stays in the table: decide_now takes it again)
        if state.fork is not None or state.closed_by is not None:
            return self._append_copied(entry, state, content_type, body)
        # The entry's pending state stays; its tail moves beside it (`Entry.pending`).
        tail = entry.pending_tail if entry.pending_moved else state.tail
        moved = core.plain_append_at(content_type, body, state, tail)
        if moved is None:
            return None
        record, offset = moved
        job = self.committer.queue_shared(
            entry, append_write(path, sid, state, record, state, True, time.time())
        )
        self.subs.notices.stage(job, path)  # (the tail moved past 0)
        return (entry, job, record, offset)

    def _append_copied(
        self, entry: Entry, state: StreamState, content_type: str, body: bytes
    ) -> Appended | None:
        """`append_typed` on a pending `state` that its plain append copies: a fork's
        (its state is stored with each append) or one with a `closed_by` (the append
        clears it). Such a state is never left advanced (`Entry.pending_moved`)."""
        parts = core.plain_append_typed(content_type, body, state, time.time())
        if parts is None:
            return None
        new_state, record, offset = parts
        return (entry, self._stage_append(entry, state, new_state, record), record, offset)

    def settled_append(self, appended: Appended) -> str | Response:
        """The answer of an `append_now` append whose job is done: its offset (a 204
        with it as Stream-Next-Offset), or the response of its failure."""
        entry, job, record, offset = appended
        if entry.committed_base is None:  # (else not absent: nothing to release)
            self.table.release_if_idle(entry)
        if job.error is not None:
            return unavailable("storage unavailable; the write was not applied")
        self._count_append(len(record.data))
        return offset

    def read_now(self, request: Request) -> tuple[Response, bytes] | None:
        """A GET or HEAD answered on the spot, without a task of its own: the response
        and its body's token (b"": none; see shard/slice_cache.py), or None when the
        request needs the full path (`handle_http`): a stream moving, a long-poll that
        waits, SSE, or records a fork reads from its source. Raises StorageUnavailable as
        `handle_http` would, before answering anything."""
        path = request.path
        if not self.handoff.admits_now(path):
            return None
        entry = self.table.get(path)
        try:
            now = time.time()
            # (the property only when it must advance the state: a call, 800 instructions)
            state = entry.committed if entry.committed_moved else entry.committed_base
            decision = core.handle(request, state, now, self.config)
            token = b""
            if type(decision) is NeedRecords:
                fork = state.fork if state is not None else None
                if fork is not None and fork.linked and decision.position < fork.position:
                    return None  # from the source's shard: the full path asks it
                self.committer.touch(entry, now)
                records, token = self.table.read_named(entry, decision.position, decision.max_bytes)
                decision = core.finish_read(request, state, records, now, self.config)
                # The token names the slice's bytes: it is the body's only when the core
                # answered with that very slice (not cut, not a 304, not an error).
                if token and decision.response.body is not records[0].data:
                    token = b""
            if type(decision) is not Reply or decision.changed:
                return None
            if decision.touch:
                self.committer.touch(entry, now)
            self._count(request, decision, decision.response)
            return decision.response, token
        finally:
            self.table.release_if_idle(entry)

    def settled(self, settling: Settling) -> Response:
        """The response of a `decide_now` append whose job is done."""
        entry, job, reply = settling
        if entry.committed is None:  # (else not absent: nothing to release)
            self.table.release_if_idle(entry)
        if job.error is not None:
            return unavailable("storage unavailable; the write was not applied")
        if reply.records:
            self._count_append(_data_size(reply.records))
        return reply.response

    async def _handle(
        self, request: Request, respond: Respond, send: SendChunk, sink: LiveSink | None
    ) -> None:
        await self.handoff.admit(request.path)  # StreamMoving while it is on its way here
        entry = self.table.get(request.path)
        try:
            await self._dispatch(entry, request, respond, send, sink)
        finally:
            self.table.release_if_idle(entry)

    async def _dispatch(
        self,
        entry: Entry,
        request: Request,
        respond: Respond,
        send: SendChunk,
        sink: LiveSink | None,
    ) -> None:
        config = self.config
        reading = request.method in ("GET", "HEAD")
        now = time.time()
        state = entry.committed if reading else entry.pending
        decision = core.handle(request, state, now, config)
        resume: Wait | None = None
        while True:
            if isinstance(decision, Reply):
                response = await self._settle(entry, decision, now)
                self._count(request, decision, response)
                await respond(response, False)
                return
            if isinstance(decision, NeedRecords):
                self.committer.touch(entry, now)
                try:
                    records = await self.forks.read(entry, decision.position, decision.max_bytes)
                except PeerUnavailable:
                    await respond(unavailable("the fork's source stream is unavailable"), False)
                    return
                decision = core.finish_read(
                    request, entry.committed, records, now, config, resume=resume
                )
            elif isinstance(decision, Wait):
                self.committer.touch(entry, now)
                await self._wait(entry, decision.position, decision.timeout)
                if self.handoff.fenced(entry.path):
                    raise StreamMoving(entry.path)  # the long-poll resumes on its new owner
                resume = decision
                now = time.time()
                decision = core.handle(request, entry.committed, now, config, resume=resume)
            elif isinstance(decision, NeedBody):
                # A large body the core needs: cut it off the loop, then decide again.
                prepared = await self.offload.prepare(request, decision.json)
                if prepared is None:
                    message = "could not validate the request body in time; nothing was written"
                    await respond(unavailable(message), False)
                    return
                request = prepared
                now = time.time()
                decision = core.handle(request, entry.pending, now, config)
            elif isinstance(decision, NeedSource):
                await respond(await self.forks.create(entry, request, decision), False)
                return
            elif isinstance(decision, StartSse):
                self.committer.touch(entry, now)
                await self._sse(entry, decision.session, respond, send, sink)
                return
            else:  # pragma: no cover - the core returned something unknown
                raise TypeError(f"unknown decision {decision!r}")

    async def _settle(self, entry: Entry, reply: Reply, now: float) -> Response:
        """Persist a Reply's changes (if any) and return the response to send."""
        if reply.changed:
            job = Job()
            self._stage(job, entry, reply.state, reply.records, fresh=reply.fresh)
            try:
                await self.committer.submit(job).wait()
            except StorageUnavailable:
                return unavailable("storage unavailable; the write was not applied")
        elif reply.touch:
            self.committer.touch(entry, now)
        return reply.response

    def _count(self, request: Request, reply: Reply, response: Response) -> None:
        """Count a committed append, or a read's body bytes, for metrics."""
        if request.method == "POST":
            if reply.records and response is reply.response:  # committed (not a 503)
                self._count_append(_data_size(reply.records))
        elif request.method == "GET":
            self.counters.read_bytes += len(response.body)

    def _count_append(self, size: int) -> None:
        """Count a committed append of `size` bytes of records, for metrics."""
        counters = self.counters
        counters.appends += 1
        counters.append_bytes += size

    def _stage(
        self,
        job: Job,
        entry: Entry,
        state: StreamState | None,
        records: tuple[Record, ...] = (),
        *,
        fresh: bool = False,
    ) -> StreamWrite:
        """Add one stream's new state to `job`, with the fork release it implies; the
        write added."""
        previous = entry.pending
        old_sid = entry.pending_sid
        if state is None:
            sid = old_sid if old_sid is not None else self.table.new_sid()
        elif previous is None or fresh or old_sid is None:
            sid = self.table.new_sid()
        else:
            sid = old_sid
        replaced = previous is not None and (state is None or sid != old_sid)
        if replaced and previous is not None and previous.fork is not None:
            job.outbox_put.append((previous.fork.ref, previous.fork.source, "due"))
        kept = previous if not replaced else None  # the state this write follows, if any
        producers = kept.producers if kept is not None else None
        write = StreamWrite(entry.path, sid, old_sid, state, tuple(records), producers, kept)
        # New data, or the stream gone: matching subscriptions' owners are told after
        # the commit, from a notice row committed with this write.
        new_tail = state.tail if state is not None else None
        old_tail = previous.tail if previous is not None else None
        if new_tail != old_tail and (new_tail is None or new_tail > 0):
            self.subs.notices.stage(job, entry.path)
        job.writes.append((entry, write))  # (last: the job may be queued already)
        return write

    def _stage_append(
        self, entry: Entry, previous: StreamState, state: StreamState, record: Record
    ) -> Job:
        """`_stage` of a plain append that copies its state (`_append_copied`:
        `core.plain_append_parts`'s `state` and `record` from `previous`, the entry's
        pending state, of the incarnation `entry.pending_sid`), queued in the
        committer's shared job (which it returns), in fewer steps: the same incarnation,
        no fork released, new data to notify subscriptions of. Its state is `previous`
        advanced (core.model.advance): only the tail, the last access, `closed` (False,
        as before: the stream was not closed) and `closed_by` (None) may differ, so the
        stored row may lag (`tail_moved`) unless `previous` has a fork origin or a
        `closed_by`; no TTL or expiry time, or the append would not be plain."""
        path = entry.path
        write = append_write(
            path,
            entry.pending_sid,  # type: ignore[arg-type]  # (not None: the caller checked)
            state,
            record,
            previous,
            previous.fork is None and previous.closed_by is None,
        )
        job = self.committer.queue_shared(entry, write)
        self.subs.notices.stage(job, path)  # (the tail moved past 0)
        return job

    # -- long-polls parked without a task (`shard.polls`) --------------------------------

    def park_now(self, request: Request, answer: Answer) -> ParkedPoll | None:
        """A long-poll that must wait, parked on its stream without a task: `answer`
        sends its answer later. None when it does not wait (`read_now` answers it) or
        takes the full path (`handle_http`): a stream moving or absent, a fork (its
        answer may need its source). Raises StorageUnavailable as `handle_http` would,
        before parking anything."""
        path = request.path
        if not self.handoff.admits_now(path):
            return None
        entry = self.table.get(path)
        try:
            state = entry.committed
            if state is None or state.fork is not None:
                return None
            now = time.time()
            decision = core.handle(request, state, now, self.config)
            if type(decision) is not Wait:
                return None
            self.committer.touch(entry, now)
            return self._park(entry, request, decision, answer)
        finally:
            self.table.release_if_idle(entry)

    def _park(self, entry: Entry, request: Request, wait: Wait, answer: Answer) -> ParkedPoll:
        deadline = trio.current_time() + wait.timeout
        poll = ParkedPoll(entry, request, wait, deadline, answer, self._poll_changed)
        entry.waiters += 1
        self.counters.long_polls += 1
        entry.park(poll)
        self.poll_timer.add(poll)
        return poll

    def _poll_changed(self, poll: ParkedPoll) -> bool:
        """`poll`'s stream changed (a commit, a fence): answer it and return False when
        the task path's `_wait` would have returned, else True (it stays parked)."""
        entry = poll.entry
        if self.handoff.fenced(entry.path):
            self._poll_finish(poll, StreamMoving(entry.path))  # it resumes on its new owner
            return False
        state = entry.committed
        if (
            state is not None
            and not state.closed
            and not state.soft_deleted
            and state.tail <= poll.wait.position
        ):
            return True
        self._poll_finish(poll, None)
        return False

    def _poll_expired(self, poll: ParkedPoll) -> None:
        """`poll`'s timeout passed (the timer has dropped it already)."""
        poll.entry.unpark(poll)
        failure = StreamMoving(poll.entry.path) if self.handoff.fenced(poll.entry.path) else None
        self._poll_finish(poll, failure, timed_out=True)

    def cancel_poll(self, poll: ParkedPoll) -> None:
        """The caller gave up on `poll` (a `cancel`, its connection closed): nothing is sent."""
        if poll.done:
            return
        poll.entry.unpark(poll)
        self._poll_done(poll)
        self.poll_timer.done()
        self.table.release_if_idle(poll.entry)

    def _poll_done(self, poll: ParkedPoll) -> None:
        poll.done = True
        poll.entry.waiters -= 1
        self.counters.long_polls -= 1

    def _poll_finish(
        self, poll: ParkedPoll, failure: Exception | None, *, timed_out: bool = False
    ) -> None:
        """Send `poll` its answer (already off its entry's list): `failure`'s, or the
        core's, decided again with `resume=` its Wait, as `_dispatch` would."""
        self._poll_done(poll)
        if not timed_out:
            self.poll_timer.done()
        outcome: Response | Exception
        if failure is not None:
            outcome = failure
        else:
            try:
                outcome = self._poll_answer(poll)
            except Exception as exc:  # the connection answers it, as the task path would
                outcome = exc
        poll.answer(outcome)
        self.table.release_if_idle(poll.entry)

    def _poll_answer(self, poll: ParkedPoll) -> Response:
        entry, request = poll.entry, poll.request
        config = self.config
        now = time.time()
        state = entry.committed
        decision = core.handle(request, state, now, config, resume=poll.wait)
        if type(decision) is NeedRecords:
            fork = state.fork if state is not None else None
            if fork is not None and fork.linked and decision.position < fork.position:
                # replaced by a fork in the same group commit: its source is not at hand
                return unavailable("the stream was replaced; read it again")
            self.committer.touch(entry, now)
            records = self.table.read(entry, decision.position, decision.max_bytes)
            decision = core.finish_read(request, state, records, now, config, resume=poll.wait)
        if type(decision) is not Reply or decision.changed:
            raise TypeError(f"unexpected decision for a parked long-poll: {decision!r}")
        if decision.touch:
            self.committer.touch(entry, now)
        self._count(request, decision, decision.response)
        return decision.response

    async def _wait(self, entry: Entry, position: int, timeout: float) -> None:
        """Park until the committed stream moves past `position`, closes or goes away,
        or `timeout` seconds pass (the committed state then tells the core which)."""
        entry.waiters += 1
        self.counters.long_polls += 1
        try:
            with trio.move_on_after(timeout):
                while not self.handoff.fenced(entry.path):
                    state = entry.committed
                    if state is None or state.closed or state.soft_deleted:
                        return
                    if state.tail > position:
                        return
                    await entry.changed_event().wait()
        finally:
            entry.waiters -= 1
            self.counters.long_polls -= 1

    async def _sse(
        self,
        entry: Entry,
        session: LiveSession,
        respond: Respond,
        send: SendChunk,
        sink: LiveSink | None,
    ) -> None:
        # The head goes out after the first read, so a fork whose source cannot be read
        # answers 503; a later failure ends the response (the client resumes). At the
        # committed tail the session waits parked on its stream, its chunks pushed by the
        # commits (`shard.live_sse`), when it has a `sink`; else for its stream's event.
        started = False
        entry.waiters += 1
        self.counters.sse_sessions += 1
        try:
            with trio.move_on_at(trio.current_time() + (session.ends_at - time.time())):
                while not session.done:
                    if self.handoff.fenced(entry.path):
                        raise StreamMoving(entry.path)  # the reader resumes on the new owner
                    state = entry.committed
                    position = session.position
                    records: list[Record] = []
                    if state is not None and not state.soft_deleted and state.tail > position:
                        try:
                            records = await self.forks.read(entry, position, session.read_bytes)
                        except PeerUnavailable:
                            if started:
                                break
                            message = "the fork's source stream is unavailable"
                            await respond(unavailable(message), False)
                            return
                    if not started:
                        await respond(session.head, True)
                        started = True
                    out = self._sse_chunk(session, state, records)
                    if out is not None:
                        await send(out, not session.done)
                    if session.done:
                        return
                    current = entry.committed
                    if current is state and (state is None or state.tail <= session.position):
                        if sink is None:
                            await entry.changed_event().wait()
                        elif await self._sse_parked(entry, session, sink):
                            return  # a commit sent its last chunk
        finally:
            entry.waiters -= 1
            self.counters.sse_sessions -= 1
        if not started:
            await respond(session.head, True)
        await send(b"", False)

    def _sse_chunk(
        self, session: LiveSession, state: StreamState | None, records: list[Record]
    ) -> bytes | None:
        """The core's next step of `session` over `records`, counted: the chunk to send,
        or None when there is nothing to send (b"" ends a deleted stream's session)."""
        out = session.step(state, records, time.time())
        if out or session.done:
            self.counters.read_bytes += len(out)
            return out
        return None

    async def _sse_parked(self, entry: Entry, session: LiveSession, sink: LiveSink) -> bool:
        """Wait parked on `entry` while its commits push `session`'s chunks to `sink`
        (`_sse_pushed`): True once one ended the session, False when the task goes on
        (raising what serving it raised)."""
        parked = ParkedSse(entry, session, sink, self._sse_pushed)
        entry.park(parked)
        try:
            await parked.handed_back.wait()
        finally:
            parked.unpark()  # (cancelled: the deadline, a cancel, the connection's end)
        if parked.error is not None:
            raise parked.error
        return session.done

    def _sse_pushed(self, parked: ParkedSse) -> bool:
        """`parked`'s stream changed: send what its commits added, stepped by the core, as
        `_sse` would; True to stay parked. False hands the session back to its task: it
        is over (its last chunk sent), or it needs what only the task does: wait for the
        connection's room, read from disk or a fork's source, leave a stream moving."""
        entry, session, sink = parked.entry, parked.session, parked.sink
        if self.handoff.fenced(entry.path):
            return False
        while True:
            state = entry.committed
            position = session.position
            records: list[Record] = []
            if state is not None and not state.soft_deleted and state.tail > position:
                fork = state.fork
                if fork is not None and fork.linked and position < fork.position:
                    return False  # from the source's shard
                recent = self.table.read_recent(entry, position, session.read_bytes)
                if recent is None:
                    return False  # no longer in memory
                records = recent
            if not sink.room():
                return False
            out = self._sse_chunk(session, state, records)
            if out is not None:
                sink.push(out, not session.done)
            if session.done:
                return False
            if state is None or state.tail <= session.position:
                return True

    # -- expiry --------------------------------------------------------------------------------

    async def _expire(self, path: str) -> float | None:
        if not self.owns(path):
            return None  # its new owner keeps its deadline
        try:
            entry = self.table.get(path)
        except StorageUnavailable:
            return time.time() + 1.0  # retry once storage is back
        try:
            await entry.wait_settled()
            state = entry.pending
            if state is None:
                return None
            reply = core.expire(state, time.time())
            if reply is None:
                return state.deadline()
            job = Job()
            self._stage(job, entry, reply.state, reply.records)
            try:
                await self.committer.submit(job).wait()
            except StorageUnavailable:
                return time.time() + 1.0  # retry once storage is back
            except StreamMoving:
                return None  # moving away (its new owner expires it) or arriving (re-armed)
            return None
        finally:
            self.table.release_if_idle(entry)


def _data_size(records: tuple[Record, ...]) -> int:
    """The bytes of data `records` hold."""
    size = 0
    for record in records:
        size += len(record.data)
    return size
