"""Fork coordination on a shard: creating forks, serving their sources, reading through them.

A fork holds a reference on its source and stores only its own records; what it inherited
stays in the source and is read from there (`read`), on this shard or over the `read_fork`
RPC, with the reference as the capability. So creating a fork costs the same for a source
of any size, and no data is copied. The source's side counts references (`export`),
drops them (`release`) and serves inherited reads (`serve_read`), also for a source that
is soft-deleted or expired: it keeps its records until its last fork lets go.

The service hands in what this needs: the store (reference lookups, the outbox on
restart), the committer, the stream table, and `stage`, which adds a stream's new state
to a commit job together with the fork release it implies.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import trio

from ds_cluster.common.ring import RingHolder
from ds_cluster.common.rpc_client import ShardPool
from ds_cluster.shard import core
from ds_cluster.shard.committer import Committer, Job, StorageUnavailable, StreamMoving
from ds_cluster.shard.core.errors import error_response, unavailable
from ds_cluster.shard.core.headers import is_json
from ds_cluster.shard.core.model import (
    CoreConfig,
    ForkExport,
    NeedSource,
    Record,
    Reply,
    Request,
    Response,
    StreamState,
)
from ds_cluster.shard.outbox import Outbox
from ds_cluster.shard.peers import ForkPeers, PeerUnavailable
from ds_cluster.shard.store import Store
from ds_cluster.shard.streams import Entry, StreamTable

log = logging.getLogger(__name__)

# (job, entry, new state, records, fresh) -> the write added; see ShardService._stage
Stage = Callable[..., object]

MAX_SERVED_BYTES = 8 * 1024 * 1024  # per read_fork answer (a single record may exceed it)
READ_RETRIES = 3  # a read whose stream was replaced while it waited on the source restarts


async def _always(path: str) -> None:
    """Every stream may be served (a coordinator without a handoff: unit uses)."""


class ForkCoordinator:
    """Both sides of forks on one shard; the `peers` reach the other shards."""

    def __init__(
        self,
        shard_id: str,
        ring: RingHolder,
        store: Store,
        committer: Committer,
        table: StreamTable,
        config: CoreConfig,
        stage: Stage,
        pool: ShardPool | None = None,
    ) -> None:
        self._shard_id = shard_id
        self._ring = ring
        self._store = store
        self._committer = committer
        self._table = table
        self._config = config
        self._stage = stage
        self.peers = ForkPeers(ring, shard_id, self, pool)  # pool: None for one shard
        self.outbox = Outbox(store, committer, self.peers.release_fork)
        self._ref_lock = trio.Lock()  # reference changes are rare; serialize them
        # Raises StreamMoving while a source stream we own is not here yet (shard.handoff).
        self.admit: Callable[[str], Awaitable[None]] = _always

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver pending releases (those left by a previous run first)."""
        await self.outbox.recover()
        task_status.started()
        await self.outbox.run()

    def owns(self, path: str) -> bool:
        return self._ring.current.owns(self._shard_id, path)

    # -- reads: any stream, a linked fork's inherited part from its source --------------

    async def read(self, entry: Entry, position: int, max_bytes: int) -> list[Record]:
        """Committed records of `entry` with end > `position`, in order, until `max_bytes`
        (at least one when any exists). A linked fork's records below its divergence
        position come from its source. Raises PeerUnavailable if the source cannot
        answer now: a reader gets an error, never a gap."""
        for _ in range(READ_RETRIES):
            state, sid = entry.committed, entry.committed_sid
            fork = state.fork if state is not None else None
            if state is None or fork is None or not fork.linked or position >= fork.position:
                return self._table.read(entry, position, max_bytes)
            records = await self._inherited(state, position, max_bytes)
            if entry.committed_sid != sid:
                continue  # replaced (deleted, re-created) while the source answered
            size = sum(len(r.data) for r in records)
            if records[-1].end >= fork.position and size < max_bytes:
                records += self._table.read(entry, fork.position, max_bytes - size)
            return records
        raise PeerUnavailable(f"{entry.path} changed during every read attempt")

    async def _inherited(self, state: StreamState, position: int, max_bytes: int) -> list[Record]:
        fork = state.fork
        assert fork is not None
        records = await self._follow(fork.source, fork.ref, position, fork.position, max_bytes)
        if records is None:
            # The source no longer knows the reference this fork holds: never expected
            # (a source keeps its data while referenced), so say it loudly.
            log.error("%s: fork reference %s not held on %r", state.path, fork.ref, fork.source)
            raise PeerUnavailable(f"no fork reference {fork.ref} on {fork.source!r}")
        records = core.clip_below(records, fork.position, is_json(state.content_type))
        if not records or records[0].start > position or records[0].end <= position:
            raise PeerUnavailable(f"the source {fork.source!r} did not return position {position}")
        return records

    async def serve_read(
        self, source: str, ref: str, position: int, limit: int, max_bytes: int
    ) -> list[Record] | None:
        """The source's side of an inherited read (the `read_fork` op): records of
        `source` with end > `position`, cut at `limit`, for the holder of reference `ref`
        only (None if `ref` is not held on `source`). Soft-deleted and expired sources
        still answer: they keep their records while referenced."""
        await self.admit(source)
        return await self._follow(source, ref, position, limit, min(max_bytes, MAX_SERVED_BYTES))

    async def _follow(
        self, source: str, ref: str, position: int, limit: int, max_bytes: int
    ) -> list[Record] | None:
        """Read `source` through `ref`, as `read` reads a stream, cut at `limit`.

        A source that is itself a linked fork, read below its own divergence position,
        is read as its source's records followed by its own. Down the chain in a loop
        while it stays on this shard (no recursion, however long the chain), with one
        `read_fork` call where it leaves it (that shard goes on from there); then back
        up, each fork's own records continue its source's while the budget lasts."""
        hops: list[tuple[Entry, int, int, bool]] = []  # (fork, divergence, limit, json)
        held: list[Entry] = []
        try:
            while True:
                owner = self.peers.remote_owner(source)
                if owner is not None:  # that shard cuts at `limit`, as below
                    records = await self.peers.read_fork(
                        owner, source, ref, position, limit, max_bytes
                    )
                    break
                if self._store.ref_source(ref) != source:
                    return None
                entry = self._table.get(source)
                held.append(entry)
                state = entry.committed
                if state is None:
                    return None
                json_mode = is_json(state.content_type)
                limit = min(limit, state.tail)
                fork = state.fork
                if position >= limit:
                    records = []
                    break
                if fork is None or not fork.linked or position >= fork.position:
                    records = core.clip_below(
                        self._table.read(entry, position, max_bytes), limit, json_mode
                    )
                    break
                hops.append((entry, fork.position, limit, json_mode))
                source, ref, limit = fork.source, fork.ref, min(limit, fork.position)
            for entry, divergence, hop_limit, json_mode in reversed(hops):
                size = sum(len(r.data) for r in records)
                if not records or records[-1].end < divergence or size >= max_bytes:
                    break
                if divergence < hop_limit:
                    own = self._table.read(entry, divergence, max_bytes - size)
                    records += core.clip_below(own, hop_limit, json_mode)
            return records
        finally:
            for entry in held:
                self._table.release_if_idle(entry)

    # -- creation: the fork's side ---------------------------------------------------------

    async def create(self, entry: Entry, request: Request, need: NeedSource) -> Response:
        """A fork PUT after the core's NeedSource: take a reference on the source (the
        intent to release it is durable first), then store the fork's origin."""
        ref = uuid.uuid4().hex
        intent = Job(outbox_put=[(ref, need.source, "provisional")])
        try:
            await self._committer.submit(intent).wait()
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
            reply = core.handle(request, entry.pending, now, self._config)
            await self._release_later(ref, need.source)
            return reply.response if isinstance(reply, Reply) else unavailable("retry")
        reply = core.create_fork(request, export, now, self._config, ref=ref)
        if not reply.changed or reply.state is None:
            await self._release_later(ref, need.source)
            return reply.response
        job = Job(outbox_removed=[ref])
        self._stage(job, entry, reply.state, reply.records, fresh=True)
        try:
            await self._committer.submit(job).wait()
        except StorageUnavailable:
            await self._release_later(ref, need.source)
            return unavailable("storage unavailable; the fork was not created")
        except StreamMoving:  # the fork's own path left this shard meanwhile
            await self._release_later(ref, need.source)
            raise
        return reply.response

    async def _release_later(self, ref: str, source: str) -> None:
        job = Job(outbox_put=[(ref, source, "due")])
        # On failure the provisional entry stays, and recovery releases it.
        with contextlib.suppress(StorageUnavailable):
            await self._committer.submit(job).wait()

    async def _forget_intent(self, ref: str) -> None:
        with contextlib.suppress(StorageUnavailable):
            await self._committer.submit(Job(outbox_removed=[ref])).wait()

    # -- references: the source's side -----------------------------------------------------

    async def export(
        self,
        source: str,
        offset: str | None,
        sub_offset: int,
        ref: str,
        content_type: str | None = None,
    ) -> Response | ForkExport:
        """Count a new fork's reference on `source`, durably, and tell it where it forks.
        Reads one record at most (a sub-offset's anchor), whatever the source's size."""
        if not self.owns(source):
            return error_response(421, "this shard does not own the source stream")
        await self.admit(source)
        async with self._ref_lock:
            entry = self._table.get(source)
            try:
                for _ in range(READ_RETRIES):
                    await entry.wait_settled()
                    state = entry.committed
                    now = time.time()
                    plan = core.plan_export(
                        state, offset, sub_offset, now, self._config, content_type=content_type
                    )
                    if isinstance(plan, Response):
                        return plan
                    anchor = await self.read(entry, plan, 1) if sub_offset > 0 else []
                    if entry.inflight or entry.committed is not state:
                        continue  # a write landed while a linked source's anchor was read
                    result = core.export_fork(
                        state,
                        offset,
                        sub_offset,
                        anchor,
                        now,
                        self._config,
                        content_type=content_type,
                    )
                    if isinstance(result, Response):
                        return result
                    export, new_state = result
                    if self._store.has_ref(ref):
                        return export  # a retried export: the reference is already counted
                    job = Job(refs_added=[(ref, source)])
                    self._stage(job, entry, new_state)
                    await self._committer.submit(job).wait()
                    return export
                return unavailable("the source stream kept changing; retry the fork")
            finally:
                self._table.release_if_idle(entry)

    async def release(self, source: str, ref: str) -> None:
        """A fork of `source` is gone: drop its reference; purge a soft-deleted source."""
        await self.admit(source)
        async with self._ref_lock:
            if not self._store.has_ref(ref):
                return  # already released (a retried delivery)
            entry = self._table.get(source)
            try:
                await entry.wait_settled()
                job = Job(refs_removed=[ref])
                state = entry.pending
                if state is not None:
                    self._stage(job, entry, core.release_fork(state, time.time()))
                await self._committer.submit(job).wait()
            finally:
                self._table.release_if_idle(entry)
