"""Telling subscription owners that streams on this shard have new tails.

A write to a stream that a registration matches (`Registry`) adds a notice row to the
store's `outbox` in the write's own transaction (`stage`, from the service's staging of
the write): once the write is acknowledged, its notice is durable, whatever happens to
this process next. A delivery loop then sends each owner, over the shard RPC, the current
committed tail of every noticed path (`sub_notify`, one call per owner for all its
subscriptions and paths, in rounds that gather what commits within GATHER_DELAY), and
deletes the rows the owner has acknowledged (within the
transaction of the next write on this shard, so under load a notice costs no commit of
its own; after a second without writes, alone). While a
path's row is waiting, later writes to it add nothing: one notice covers every write
before its delivery reads the tail, so appends cost one row per delivery round, not one
per append. After a restart the rows left are delivered again (owners take tails as a
maximum, so a repeat is harmless).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import trio

from ds_cluster.common.backoff import RetryPacer
from ds_cluster.shard.committer import Committer, Job, StorageUnavailable
from ds_cluster.shard.core.offsets import encode
from ds_cluster.shard.store import NOTICE_STATUS
from ds_cluster.shard.subscriptions.registry import Registry

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.05
MAX_BACKOFF = 5.0
MAX_PATHS_PER_ROUND = 5_000
REMOVAL_DELAY = 1.0  # delivered rows wait this long for a write to delete them with
GATHER_DELAY = 0.02  # a round starts this long after the first notice of a quiet spell
BUSY_DELAY = 0.02  # a path written during its delivery is delivered again after this

Item = list[object]  # [sub id, path, tail offset or None]
# (owner shard, items) -> the subscription ids the owner does not know (they are gone)
Send = Callable[[str, list[Item]], Awaitable[list[str]]]
Probe = Callable[[str], tuple[int | None, bool]]  # path -> (committed tail, writes in flight)


class Notices:
    def __init__(
        self,
        registry: Registry,
        committer: Committer,
        owner_of: Callable[[str], str],
        probe: Probe,
        send: Send,
        forget: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        self._registry = registry
        self._committer = committer
        self._owner_of = owner_of
        self._probe = probe
        self._send = send
        self._forget = forget
        self._staged: dict[str, tuple[str, Job | None]] = {}  # path -> (row key, its job)
        self._ready: dict[str, str] = {}  # path -> key of a committed row
        self._pacer = RetryPacer(MIN_BACKOFF, MAX_BACKOFF)
        self._removals: list[str] = []  # keys of delivered rows, to delete with a write
        self._removals_due = trio.Event()
        self._keys = itertools.count()
        self._prefix = f"n{time.time_ns():x}-"

    def stage(self, job: Job, path: str) -> None:
        """`job` writes `path`: add a notice row to it unless one is already waiting.
        Rows already delivered are deleted in the same transaction, for free."""
        if self._removals:
            job.outbox_removed += self._removals
            self._removals = []
        registry = self._registry
        if registry.empty or not registry.matches(path):
            return
        staged = self._staged.get(path)
        if staged is not None:
            other = staged[1]
            if other is None or not other.done.is_set() or other.error is None:
                return  # a row waits (or commits) that covers this write too
        key = f"{self._prefix}{next(self._keys)}"
        self._staged[path] = (key, job)
        job.outbox_put.append((key, path, NOTICE_STATUS))

    def committed(self, key: str, path: str) -> None:
        """A notice row committed (from the service's after-commit hook)."""
        staged = self._staged.get(path)
        if staged is not None and staged[0] == key:
            self._staged[path] = (key, None)
            self._ready[path] = key
            self._pacer.wake()

    def recover(self, rows: list[tuple[str, str]]) -> None:
        """Rows left by an earlier run: deliver them again (duplicates go at once)."""
        duplicates = []
        for key, path in rows:
            if path in self._ready:
                duplicates.append(key)
                continue
            self._staged[path] = (key, None)
            self._ready[path] = key
        if duplicates:
            self._committer.submit(Job(outbox_removed=duplicates))
        self._pacer.wake()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_removals)
            await self._deliver_rounds()

    async def _flush_removals(self) -> None:
        """Delivered rows are deleted by the next write's transaction (`stage`); when no
        write comes for REMOVAL_DELAY seconds, by a transaction of their own."""
        while True:
            await self._removals_due.wait()
            self._removals_due = trio.Event()
            await trio.sleep(REMOVAL_DELAY)
            if self._removals:
                done, self._removals = self._removals, []
                # Not awaited: if it fails, the rows are delivered again after a restart.
                self._committer.submit(Job(outbox_removed=done))

    async def _deliver_rounds(self) -> None:
        pacer = self._pacer
        while True:
            if not self._ready:
                await pacer.idle()
                # Gather what commits meanwhile into the same round: one RPC per owner
                # then carries many appends' notices, not one each.
                await trio.sleep(GATHER_DELAY)
                continue
            taken = dict(itertools.islice(self._ready.items(), MAX_PATHS_PER_ROUND))
            for path in taken:
                del self._ready[path]
                self._staged.pop(path, None)
            failed, again = await self._deliver(taken)
            if again and not failed:
                await trio.sleep(BUSY_DELAY)  # let the writes in flight commit first
            elif failed:
                await pacer.after_failure()
            else:
                pacer.after_success()

    async def _deliver(self, taken: dict[str, str]) -> tuple[bool, bool]:
        """One round: the tails of `taken` paths to their subscriptions' owners. Paths
        whose delivery failed, or that changed meanwhile without a newer row, are put
        back; the rest of the rows are deleted. Returns (a delivery failed, some path must
        go again)."""
        snapshot: dict[str, int | None] = {}
        by_owner: dict[str, list[Item]] = {}
        paths_of: dict[str, set[str]] = {}
        for path in taken:
            try:
                tail, _busy = self._probe(path)
            except StorageUnavailable:
                tail = -1  # unknown: retried below
            snapshot[path] = tail
            for sub_id in self._registry.matches(path):
                owner = self._owner_of(sub_id)
                offset = None if tail is None else encode(max(tail, 0))
                by_owner.setdefault(owner, []).append([sub_id, path, offset])
                paths_of.setdefault(owner, set()).add(path)
        retry = {path for path, tail in snapshot.items() if tail == -1}
        failed = bool(retry)
        gone: list[str] = []
        for owner, items in by_owner.items():
            try:
                gone += await self._send(owner, items)
            except Exception as exc:  # PeerUnavailable, storage: the rows wait
                log.info("subscription notices to %s deferred: %s", owner, exc)
                retry |= paths_of[owner]
                failed = True
        if gone:
            await self._forget(gone)
        done: list[str] = []
        for path, key in taken.items():
            if path not in retry and path not in self._staged:
                try:
                    tail, busy = self._probe(path)
                except StorageUnavailable:
                    tail, busy = -1, True
                if busy or tail != snapshot[path]:
                    retry.add(path)  # written since the snapshot, by a write with no row
            if path in retry and path not in self._staged:
                self._staged[path] = (key, None)
                self._ready[path] = key
            else:
                done.append(key)
        if done:
            self._removals += done
            self._removals_due.set()
        return failed, bool(retry)
