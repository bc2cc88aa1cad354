"""Delivery of fork releases to the source streams' shards, kept until acknowledged.

A fork's reference on its source must be released exactly when the fork is gone. The
release is written to the `outbox` table in the same transaction that removes the fork,
then delivered (possibly to another shard) with retries and backoff, and removed from the
table only once the source's shard has applied it. Releases are idempotent on the source
(keyed by reference id), so redelivery after a crash is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ds_cluster.common.backoff import RetryPacer
from ds_cluster.shard.committer import Committer, Job, StorageUnavailable
from ds_cluster.shard.peers import PeerUnavailable
from ds_cluster.shard.store import Store

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.05
MAX_BACKOFF = 5.0


class Outbox:
    """`release(source, ref)` delivers one release (raising PeerUnavailable if it cannot
    now); the store and committer hold the table."""

    def __init__(
        self,
        store: Store,
        committer: Committer,
        release: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self._store = store
        self._committer = committer
        self._release = release
        self._due: dict[str, str] = {}  # ref -> source path
        self._pacer = RetryPacer(MIN_BACKOFF, MAX_BACKOFF)

    @property
    def pending(self) -> int:
        """Releases not yet delivered (a shard leaving the ring waits for them)."""
        return len(self._due)

    def add(self, ref: str, source: str) -> None:
        self._due[ref] = source
        self._pacer.wake()

    async def recover(self) -> None:
        """After a restart: provisional intents whose fork never committed become due."""
        store = self._store
        fix = Job()
        for ref, source, status in store.load_outbox():
            if status == "provisional":
                if store.fork_ref_in_use(ref):
                    fix.outbox_removed.append(ref)
                    continue
                fix.outbox_put.append((ref, source, "due"))
            self._due[ref] = source
        if fix.outbox_put or fix.outbox_removed:
            await self._committer.submit(fix).wait()

    async def run(self) -> None:
        pacer = self._pacer
        while True:
            if not self._due:
                await pacer.idle()
                continue
            failed = False
            for ref, source in list(self._due.items()):
                try:
                    await self._release(source, ref)
                    await self._committer.submit(Job(outbox_removed=[ref])).wait()
                except (PeerUnavailable, StorageUnavailable) as exc:
                    log.info("fork release %s on %s deferred: %s", ref, source, exc)
                    failed = True
                    continue
                self._due.pop(ref, None)
            if failed:
                await pacer.after_failure()
            else:
                pacer.after_success()
