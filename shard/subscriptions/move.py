"""Subscriptions moving with the ring: both ends, and re-registration under a new ring.

When a shard adopts a ring under which another shard owns some of its subscriptions
(`owner_key(id)` hashes there now), it hands each to its new owner, under the same rules
as streams (shard/handoff.py):

* **Fenced at the old owner.** From the ring change on, requests about the subscription
  are refused here (`misdirected`: the gateway retries on the newest ring), no delivery
  or lease expiry starts, and notices for it are not applied (they stay in their
  outboxes and are re-routed by the ring at their next delivery). A delivery already
  running finishes and is saved first; then the state is read under the subscription's
  lock, and it can no longer change.
* **Committed whole at the new owner before it serves it.** `move_sub` carries the
  whole state (configuration, generation, cursors, wake, lease, retry schedule); the
  new owner saves it in one transaction and only then holds it. Until then it answers
  a subscription it does not hold with `moving` while any shard may still hold one for
  it (its ring's sources), and refuses notices for it (they are retried) rather than
  calling it gone.
* **Journaled, resumable, idempotent.** The old owner's row is the journal: it is
  deleted only after the new owner answered `done`; a shard restarted halfway sends
  again, and a new owner that holds the subscription already answers `done` without
  overwriting it. A source counts the subscriptions it still holds for a shard in its
  `move_query` answer, so it stays a source (and `move_status` is not done) until they
  have left.

Registrations follow: after a ring change every owner registers each subscription it
owns again under the new ring (the pattern with every shard, explicit links with the
paths' new owners; registering is idempotent), and an arrived subscription likewise. The
tails those answers carry are applied as notices, so an append that a newly joined
shard made before it knew of a pattern still wakes the subscription.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import trio

from ds_cluster.common import wire
from ds_cluster.common.backoff import jittered
from ds_cluster.common.ring import Ring
from ds_cluster.shard.committer import StorageUnavailable
from ds_cluster.shard.core.subscriptions import Sub
from ds_cluster.shard.peers import PeerUnavailable
from ds_cluster.shard.ring_state import ShardRing
from ds_cluster.shard.subscriptions import Subscriptions
from ds_cluster.shard.subscriptions.owner import SubscriptionsUnavailable, owner_key

log = logging.getLogger(__name__)

MOVE_TIMEOUT = 30.0  # seconds for one move_sub
QUIET_WAIT = 30.0  # seconds a running delivery may take before the move goes on anyway
RETRY_MIN, RETRY_MAX = 0.1, 2.0
MAX_STATE_BYTES = 16 * 1024 * 1024

Call = Callable[[str, str, wire.Args, float], Awaitable[wire.Args]]  # (shard, op, args, timeout)


class SubMover:
    """Sends the subscriptions this shard no longer owns, takes those that arrive, and
    registers what it owns again when the ring changes."""

    def __init__(self, rings: ShardRing, subs: Subscriptions, call: Call) -> None:
        self._rings = rings
        self.me = rings.shard_id
        self._subs = subs
        self._owner = subs.owner
        self._call = call
        self._work = trio.Event()
        self._register: set[str] = set()  # subscriptions to register under the ring
        self._loaded = False
        self.sent = 0
        self.received = 0
        rings.on_change.append(self._ring_changed)
        subs.owner.arriving = self.may_arrive
        subs.after_load.append(self.run)

    def _ring_changed(self, old: Ring, new: Ring) -> None:
        self._register.update(self._owner.ids())
        self._work.set()

    def may_arrive(self) -> bool:
        """Whether a subscription this shard owns but does not hold may still be on its
        way here (a shard it came from may hold it)."""
        return any(sid != self.me for sid in self._rings.sources)

    def holding(self, asker: str | None) -> int:
        """How many subscriptions this shard holds for `asker` (None: for any other
        shard); -1 before they are loaded."""
        if not self._loaded:
            return -1
        ring = self._rings.current
        count = 0
        for sub_id in self._owner.ids():
            owner = ring.owner(owner_key(sub_id))
            if owner != self.me and (asker is None or owner == asker):
                count += 1
        return count

    # -- sending -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Move out and register until cancelled (the caller loaded the subscriptions)."""
        self._loaded = True
        self._register.update(self._owner.ids())  # a restart may have missed a change
        backoff = RETRY_MIN
        while True:
            self._work = trio.Event()
            failed = await self._send_all()
            failed |= await self._register_all()
            if failed:
                with trio.move_on_after(jittered(backoff)):
                    await self._work.wait()
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            backoff = RETRY_MIN
            await self._work.wait()

    async def _send_all(self) -> bool:
        failed = False
        for sub_id in self._owner.ids():
            if self._rings.current.owner(owner_key(sub_id)) == self.me:
                continue
            try:
                await self._send(sub_id)
            except (PeerUnavailable, StorageUnavailable, wire.OpError) as exc:
                log.info("moving subscription %r deferred: %s", sub_id, exc)
                failed = True
        return failed

    async def _send(self, sub_id: str) -> None:
        """Hand `sub_id` to its owner under our ring, then drop our row."""
        await self._owner.quiesce(sub_id, QUIET_WAIT)
        async with self._owner.locked(sub_id) as sub:
            ring = self._rings.current
            target = ring.owner(owner_key(sub_id))
            if sub is None or target == self.me:
                return
            state = json.dumps(sub.to_json(), separators=(",", ":"))
            args: wire.Args = {"ring": ring.to_wire(), "from": self.me, "sub": state}
            answer = await self._call(target, "move_sub", args, MOVE_TIMEOUT)
            if answer.get("status") != "done":
                raise PeerUnavailable(f"{target} answered {answer.get('status')!r}")
            await self._owner.forget(sub_id)
        self.sent += 1
        log.info("subscription %r handed to %s (ring v%d)", sub_id, target, ring.version)

    # -- receiving -----------------------------------------------------------------------------

    async def receive(self, raw: object) -> wire.Args:
        """`move_sub` (the sender's ring already adopted): commit the subscription whole,
        unless this shard holds it already (a retry after the sender was restarted)."""
        if not isinstance(raw, str) or len(raw) > MAX_STATE_BYTES:
            raise wire.BadArguments("move_sub: sub must be a JSON string")
        try:
            sub = Sub.from_json(json.loads(raw))
        except Exception as exc:  # a peer's bytes: any decoding failure is a bad argument
            raise wire.BadArguments(f"move_sub: undecodable subscription: {exc}") from None
        ring = self._rings.current
        if ring.owner(owner_key(sub.id)) != self.me:
            raise wire.Misdirected(f"not the owner of subscription {sub.id[:100]!r}")
        if await self._owner.adopt(sub):
            self.received += 1
            log.info("subscription %r arrived (ring v%d)", sub.id, ring.version)
        self._register.add(sub.id)
        self._work.set()
        return {"status": "done"}

    # -- registrations -------------------------------------------------------------------------

    async def _register_all(self) -> bool:
        failed = False
        for sub_id in sorted(self._register):
            if self._rings.current.owner(owner_key(sub_id)) != self.me:
                self._register.discard(sub_id)  # its new owner registers it
                continue
            try:
                await self._owner.register_again(sub_id)
                self._register.discard(sub_id)
            except (SubscriptionsUnavailable, StorageUnavailable) as exc:
                log.info("registering subscription %r again deferred: %s", sub_id, exc)
                failed = True
        return failed
