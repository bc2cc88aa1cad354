"""The shard runtime: runs the sans-IO core against the store, the hub and the alarms.

`ShardService` turns core decisions into I/O: it persists Replies through the group
committer (acknowledging only after commit), feeds records to reads, parks long-polls and
SSE sessions on their stream's hub event, expires streams from the alarm loop, and does
the source side of cross-shard forks (export a fork, release a fork).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import trio

from common.ring import Ring
from common.rpc_client import ShardPool
from shard import core
from shard.alarms import AlarmLoop
from shard.committer import Committer, Job, StorageUnavailable
from shard.core.model import (
    CoreConfig,
    ForkExport,
    NeedRecords,
    NeedSource,
    Reply,
    Request,
    Response,
    StartSse,
    StreamState,
    Wait,
)
from shard.core.sse import SseSession
from shard.outbox import Outbox
from shard.peers import ForkPeers, PeerUnavailable
from shard.store import Store, StreamWrite
from shard.streams import Entry, StreamTable

log = logging.getLogger(__name__)

Respond = Callable[[Response, bool], Awaitable[None]]  # (head, more body follows)
SendChunk = Callable[[bytes, bool], Awaitable[None]]  # (body bytes, more follows)


def text_response(status: int, message: str, *extra: tuple[str, str]) -> Response:
    return Response(
        status, (("content-type", "text/plain; charset=utf-8"), *extra), message.encode()
    )


def unavailable(message: str) -> Response:
    return text_response(503, message, ("retry-after", "1"))


class ShardService:
    def __init__(
        self,
        shard_id: str,
        ring: Ring,
        store: Store,
        config: CoreConfig,
        pool: ShardPool | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.ring = ring
        self.store = store
        self.config = config
        self.peers = ForkPeers(self, pool)  # pool: None for a single-shard ring
        self.table = StreamTable(store)
        self.committer = Committer(store, self._after_commit)
        self.alarms = AlarmLoop(self._expire)
        self.outbox = Outbox(self)
        self._ref_lock = trio.Lock()  # fork reference ops are rare; serialize them

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.committer.run)
            for path, deadline in self.store.load_deadlines():
                self.alarms.arm(path, deadline)
            nursery.start_soon(self.alarms.run)
            await self.outbox.recover()
            nursery.start_soon(self.outbox.run)
            task_status.started()

    def owns(self, path: str) -> bool:
        return self.ring.owns(self.shard_id, path)

    def _after_commit(self, jobs: list[Job]) -> None:
        for job in jobs:
            for entry, write in job.writes:
                if write.state is not None:
                    self.alarms.arm(entry.path, write.state.deadline())
            for ref, source, status in job.outbox_put:
                if status == "due":
                    self.outbox.add(ref, source)

    # -- HTTP requests -----------------------------------------------------------------------

    async def handle_http(self, request: Request, respond: Respond, send: SendChunk) -> None:
        entry = self.table.get(request.path)
        try:
            await self._dispatch(entry, request, respond, send)
        finally:
            self.table.release_if_idle(entry)

    async def _dispatch(
        self, entry: Entry, request: Request, respond: Respond, send: SendChunk
    ) -> None:
        config = self.config
        reading = request.method in ("GET", "HEAD")
        now = time.time()
        state = entry.committed if reading else entry.pending
        decision = core.handle(request, state, now, config)
        resume: Wait | None = None
        while True:
            if isinstance(decision, Reply):
                await respond(await self._settle(entry, decision, now), False)
                return
            if isinstance(decision, NeedRecords):
                self.committer.touch(entry, now)
                records = self.table.read(entry, decision.position, decision.max_bytes)
                decision = core.finish_read(
                    request, entry.committed, records, now, config, resume=resume
                )
            elif isinstance(decision, Wait):
                self.committer.touch(entry, now)
                timed_out = await self._wait(entry, decision.position, decision.timeout)
                resume = decision
                now = time.time()
                decision = core.handle(
                    request, entry.committed, now, config, resume=resume, timed_out=timed_out
                )
            elif isinstance(decision, NeedSource):
                await respond(await self._create_fork(entry, request, decision), False)
                return
            elif isinstance(decision, StartSse):
                self.committer.touch(entry, now)
                await self._sse(entry, decision.session, respond, send)
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

    def _stage(
        self,
        job: Job,
        entry: Entry,
        state: StreamState | None,
        records: tuple = (),
        *,
        fresh: bool = False,
    ) -> None:
        """Add one stream's new state to `job`, with the fork release it implies."""
        previous = entry.pending
        old_sid = entry.pending_sid
        if state is None:
            sid = old_sid if old_sid is not None else self.table.new_sid()
        elif previous is None or fresh:
            sid = self.table.new_sid()
        else:
            sid = old_sid  # type: ignore[assignment]
        replaced = previous is not None and (state is None or sid != old_sid)
        if replaced and previous.fork is not None:
            job.outbox_put.append((previous.fork.ref, previous.fork.source, "due"))
        producers = previous.producers if previous is not None and not replaced else None
        job.writes.append(
            (entry, StreamWrite(entry.path, sid, old_sid, state, tuple(records), producers))
        )

    async def _wait(self, entry: Entry, position: int, timeout: float) -> bool:
        """Park until the committed stream moves past `position`; True if timed out."""
        entry.waiters += 1
        try:
            with trio.move_on_after(timeout):
                while True:
                    state = entry.committed
                    if state is None or state.closed or state.soft_deleted:
                        return False
                    if state.tail > position:
                        return False
                    await entry.changed_event().wait()
            return True
        finally:
            entry.waiters -= 1

    async def _sse(
        self, entry: Entry, session: SseSession, respond: Respond, send: SendChunk
    ) -> None:
        await respond(session.head, True)
        entry.waiters += 1
        try:
            with trio.move_on_at(trio.current_time() + (session.ends_at - time.time())):
                while not session.done:
                    state = entry.committed
                    position = session.position
                    if state is not None and not state.soft_deleted and state.tail > position:
                        records = self.table.read(entry, position, self.config.max_read_bytes)
                    else:
                        records = []
                    out = session.step(state, records, time.time())
                    if out:
                        await send(out, not session.done)
                    if session.done:
                        return
                    current = entry.committed
                    if current is state and (state is None or state.tail <= session.position):
                        await entry.changed_event().wait()
        finally:
            entry.waiters -= 1
        await send(b"", False)

    # -- expiry --------------------------------------------------------------------------------

    async def _expire(self, path: str) -> float | None:
        entry = self.table.get(path)
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
            return None
        finally:
            self.table.release_if_idle(entry)

    # -- forks: the fork's side ------------------------------------------------------------------

    async def _create_fork(self, entry: Entry, request: Request, need: NeedSource) -> Response:
        ref = uuid.uuid4().hex
        intent = Job(outbox_put=[(ref, need.source, "provisional")])
        try:
            await self.committer.submit(intent).wait()
        except StorageUnavailable:
            return unavailable("storage unavailable; the fork was not created")
        try:
            export = await self.peers.export_fork(
                need.source, need.offset, need.sub_offset, ref, need.content_type
            )
        except PeerUnavailable:
            await self._release_later(ref, need.source)
            return unavailable("the source stream's shard is unavailable")
        now = time.time()
        if isinstance(export, Response):
            await self._forget_intent(ref)  # the source refused: it holds no reference
            if export.status == 421:
                return unavailable("the source stream's shard is being moved")
            return export
        if entry.pending is not None:
            # Created concurrently while we talked to the source: answer as a re-create.
            reply = core.handle(request, entry.pending, now, self.config)
            await self._release_later(ref, need.source)
            return reply.response if isinstance(reply, Reply) else unavailable("retry")
        reply = core.create_fork(request, export, now, self.config, ref=ref)
        if not reply.changed or reply.state is None:
            await self._release_later(ref, need.source)
            return reply.response
        job = Job(outbox_removed=[ref])
        self._stage(job, entry, reply.state, reply.records, fresh=True)
        try:
            await self.committer.submit(job).wait()
        except StorageUnavailable:
            await self._release_later(ref, need.source)
            return unavailable("storage unavailable; the fork was not created")
        return reply.response

    async def _release_later(self, ref: str, source: str) -> None:
        job = Job(outbox_put=[(ref, source, "due")])
        # On failure the provisional entry stays, and recovery releases it.
        with contextlib.suppress(StorageUnavailable):
            await self.committer.submit(job).wait()

    async def _forget_intent(self, ref: str) -> None:
        with contextlib.suppress(StorageUnavailable):
            await self.committer.submit(Job(outbox_removed=[ref])).wait()

    # -- forks: the source's side -----------------------------------------------------------------

    async def export_fork(
        self,
        source: str,
        offset: str | None,
        sub_offset: int,
        ref: str,
        content_type: str | None = None,
    ) -> Response | ForkExport:
        """Give a new fork its inherited records and count its reference, durably."""
        if not self.owns(source):
            return text_response(421, "this shard does not own the source stream")
        async with self._ref_lock:
            entry = self.table.get(source)
            try:
                await entry.wait_settled()
                state = entry.committed
                now = time.time()
                plan = core.plan_export(
                    state, offset, sub_offset, now, self.config, content_type=content_type
                )
                if isinstance(plan, Response):
                    return plan
                assert state is not None and entry.committed_sid is not None
                records = self.store.read_records(entry.committed_sid, 0, 1 << 62, below=plan)
                result = core.export_fork(
                    state,
                    offset,
                    sub_offset,
                    records,
                    now,
                    self.config,
                    content_type=content_type,
                )
                if isinstance(result, Response):
                    return result
                export, new_state = result
                if self.store.has_ref(ref):
                    return export  # a retried export: the reference is already counted
                job = Job(refs_added=[(ref, source)])
                self._stage(job, entry, new_state)
                await self.committer.submit(job).wait()
                return export
            finally:
                self.table.release_if_idle(entry)

    async def release_fork(self, source: str, ref: str) -> None:
        """A fork of `source` is gone: drop its reference; purge a soft-deleted source."""
        async with self._ref_lock:
            if not self.store.has_ref(ref):
                return  # already released (a retried delivery)
            entry = self.table.get(source)
            try:
                await entry.wait_settled()
                job = Job(refs_removed=[ref])
                state = entry.pending
                if state is not None:
                    self._stage(job, entry, core.release_fork(state, time.time()))
                await self.committer.submit(job).wait()
            finally:
                self.table.release_if_idle(entry)
