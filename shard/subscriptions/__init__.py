"""Subscriptions across shards (PROTOCOL.md sections 6 and 7).

Two roles on every shard:

- **Owner** of the subscriptions whose id hashes to it on the ring (`owner.SubOwner`):
  their state (links, cursors, wake, lease, retries) lives in this shard's database and
  every request about one is served here.
- **Notifier** for its own streams (`notices.Notices`): it keeps the registrations
  (`registry.Registry`, table `sub_registrations`) of every subscription whose pattern
  or explicit links may name its streams, learned when subscriptions are created or
  changed (the owner sends `sub_register` to every shard for a pattern, to the path's
  owner for an explicit link), and after a write commits it tells the matching
  subscriptions' owners the stream's new tail (`sub_notify`), from a durable outbox. An
  append is never broadcast: only the owners of matching subscriptions hear of it.

At creation the owner's `sub_register` doubles as the backfill: each shard answers with
its streams that the pattern matches (and the explicit paths it owns), at their tails.
Before a claim, and before accepting an ack past the tails it knows, the owner asks the
streams' owners for current tails (`sub_tails`).

Placement and elastic rings: everything is keyed so that it can move with the ring. A
subscription's row is keyed by its id and belongs to `ring.owner(owner_key(id))`;
registrations are keyed by (subscription, pattern or path) and are needed on every shard
(patterns) or on the path's owner (explicit links), and notices are addressed by looking
the owner up on the current ring at delivery time. Moving a subscription means moving its
row to the new owner (and, for explicit links, re-registering with the paths' new
owners); nothing else names a shard. `move.SubMover` does it when the ring changes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ds_cluster.common import wire
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardUnavailable
from ds_cluster.shard.committer import Committer
from ds_cluster.shard.core.model import Request, Response
from ds_cluster.shard.core.offsets import encode
from ds_cluster.shard.core.subscriptions import ZERO_OFFSET, glob_match, literal_prefix
from ds_cluster.shard.store import Store
from ds_cluster.shard.streams import StreamTable
from ds_cluster.shard.subscriptions.db import SubDb
from ds_cluster.shard.subscriptions.keys import SigningKeys
from ds_cluster.shard.subscriptions.notices import Item, Notices
from ds_cluster.shard.subscriptions.owner import SubOwner, SubscriptionsUnavailable, owner_key
from ds_cluster.shard.subscriptions.registry import Registry

log = logging.getLogger(__name__)

RPC_TIMEOUT = 15.0
RECONNECT_GRACE = 2.0
PAGE = 500  # streams read from the database between two checkpoints of the loop

HandleHttp = Callable[
    [
        Request,
        Callable[[Response, bool], Awaitable[None]],
        Callable[[bytes, bool], Awaitable[None]],
    ],
    Awaitable[None],
]


class Subscriptions:
    def __init__(
        self,
        shard_id: str,
        ring: Callable[[], Ring],
        store: Store,
        committer: Committer,
        table: StreamTable,
        secret: bytes,
        pool: ShardPool | None,
        handle_http: HandleHttp,
    ) -> None:
        self._shard_id = shard_id
        self._ring = ring
        self._store = store
        self._committer = committer
        self._table = table
        self._pool = pool
        self._handle_http = handle_http
        self.registry = Registry()
        self.db = SubDb(store)
        self.keys = SigningKeys(secret)
        self.owner = SubOwner(self.db, self.keys, self)
        self.owner.owns = lambda sub_id: self._owner_of(sub_id) == shard_id
        # Started with the subscriptions loaded (`move.SubMover.run`).
        self.after_load: list[Callable[[], Awaitable[None]]] = []
        self.notices = Notices(
            self.registry, committer, self._owner_of, self._probe, self._send_notices, self._forget
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the tables, load registrations, subscriptions and undelivered notices,
        then deliver (the caller started the committer and waited for storage)."""
        self.db.open()
        try:
            for sub_id, kind, value in self.db.load_registrations():
                self.registry.add(sub_id, kind, value)
            self.owner.load()
            self.notices.recover(self._store.load_notices())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.notices.run)
                nursery.start_soon(self.owner.run)
                for task in self.after_load:
                    nursery.start_soon(task)
                task_status.started()
        finally:
            self.db.close()

    def _owner_of(self, sub_id: str) -> str:
        return self._ring().owner(owner_key(sub_id))

    def routes_here(self, path: str) -> bool:
        """Whether a `__ds/...` request belongs on this shard: a subscription's routes on
        its owner; the JWK Set anywhere (every shard holds the same key)."""
        parts = path.split("/")
        if len(parts) >= 3 and parts[1] == "subscriptions":
            return self._owner_of(parts[2]) == self._shard_id
        return True

    def _probe(self, path: str) -> tuple[int | None, bool]:
        entry = self._table.get(path)
        try:
            state = entry.committed
            tail = None if state is None or state.soft_deleted else state.tail
            return tail, entry.inflight > 0
        finally:
            self._table.release_if_idle(entry)

    # -- this shard's side of the ops (also what the RPC ops call) --------------------------

    async def local_register(
        self, sub_id: str, pattern: str | None, paths: list[str]
    ) -> dict[str, str]:
        """Record the registrations durably, then answer with the tails of the streams
        here that they name (a pattern's matches; the explicit paths, ZERO if absent)."""
        rows = [(sub_id, "explicit", p) for p in paths]
        if pattern is not None:
            rows.append((sub_id, "glob", pattern))
        await self.db.register(rows)
        for row in rows:
            self.registry.add(*row)
        tails: dict[str, str] = {}
        if pattern is not None:
            prefix, after = literal_prefix(pattern), None
            while True:  # in pages, so that a pattern over many streams holds no loop long
                page, after = self.db.streams_under(prefix, after, PAGE)
                for path, position in page:
                    if glob_match(pattern, path):
                        tails[path] = encode(position)
                if after is None:
                    break
                await trio.sleep(0)
        for path, tail in (await self.local_tails(paths)).items():
            tails[path] = ZERO_OFFSET if tail is None else tail
        return tails

    async def local_unregister(self, sub_id: str, paths: list[str] | None) -> None:
        await self.db.unregister(sub_id, paths)
        self.registry.remove(sub_id, paths)

    async def local_tails(self, paths: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for start in range(0, len(paths), PAGE):
            if start:
                await trio.sleep(0)
            for path, tail in self.db.stream_tails(paths[start : start + PAGE]).items():
                out[path] = None if tail is None else encode(tail)
        return out

    async def _forget(self, sub_ids: list[str]) -> None:
        for sub_id in sub_ids:
            await self.local_unregister(sub_id, None)

    # -- Peers (for the owner) -----------------------------------------------------------------

    async def register(
        self, sub_id: str, pattern: str | None, paths: tuple[str, ...]
    ) -> dict[str, str]:
        ring = self._ring()
        by_shard: dict[str, list[str]] = {}
        for path in paths:
            by_shard.setdefault(ring.owner(path), []).append(path)
        targets = list(ring.shard_ids) if pattern is not None else list(by_shard)
        tails: dict[str, str] = {}
        for shard in targets:
            mine = by_shard.get(shard, [])
            if shard == self._shard_id:
                tails.update(await self.local_register(sub_id, pattern, mine))
                continue
            args: wire.Args = {"sub": sub_id, "pattern": pattern, "paths": mine}
            result = await self._call(shard, "sub_register", args)
            found = _tail_map(result.get("tails"))
            tails.update({p: t if t is not None else ZERO_OFFSET for p, t in found.items()})
        return tails

    async def unregister(self, sub_id: str, paths: list[str] | None, everywhere: bool) -> None:
        ring = self._ring()
        targets = (
            list(ring.shard_ids)
            if everywhere or paths is None
            else sorted({ring.owner(p) for p in paths})
        )
        for shard in targets:
            if shard == self._shard_id:
                await self.local_unregister(sub_id, paths)
            else:
                await self._call(shard, "sub_unregister", {"sub": sub_id, "paths": paths})

    async def tails(self, paths: list[str]) -> dict[str, str | None]:
        ring = self._ring()
        by_shard: dict[str, list[str]] = {}
        for path in paths:
            by_shard.setdefault(ring.owner(path), []).append(path)
        out: dict[str, str | None] = {}
        for shard, mine in by_shard.items():
            if shard == self._shard_id:
                out.update(await self.local_tails(mine))
            else:
                result = await self._call(shard, "sub_tails", {"paths": mine})
                out.update(_tail_map(result.get("tails")))
        return out

    async def append_wake(self, path: str, body: bytes, producer: str, epoch: int) -> int:
        """Append a wake event as an idempotent producer (epoch = generation, seq 0)."""
        headers = {
            "content-type": "application/json",
            "producer-id": producer,
            "producer-epoch": str(epoch),
            "producer-seq": "0",
        }
        owner = self._ring().owner(path)
        if owner == self._shard_id:
            status = 0

            async def respond(response: Response, more: bool) -> None:
                nonlocal status
                status = response.status

            async def ignore(data: bytes, more: bool) -> None:
                pass

            await self._handle_http(Request("POST", path, "", headers, body), respond, ignore)
            return status
        if self._pool is None:
            raise SubscriptionsUnavailable("no peers")
        fields = {
            "m": "POST",
            "p": path,
            "q": "",
            "h": [[k, v] for k, v in headers.items()],
            "b": body,
        }
        try:
            with trio.fail_after(RPC_TIMEOUT):
                async with self._pool.open(owner, "http", fields) as call:
                    res = await call.response()
        except (ShardUnavailable, ShardError, trio.TooSlowError) as exc:
            raise SubscriptionsUnavailable(f"wake event on {owner}: {exc}") from exc
        return int(res["s"])

    async def _send_notices(self, owner: str, items: list[Item]) -> list[str]:
        if owner == self._shard_id:
            return await self.owner.notify(
                [(str(a), str(b), c if c is None else str(c)) for a, b, c in items]
            )
        result = await self._call(owner, "sub_notify", {"items": items})
        gone = result.get("gone")
        return [g for g in gone if isinstance(g, str)] if isinstance(gone, list) else []

    async def _call(self, shard: str, op: str, args: wire.Args) -> wire.Args:
        if self._pool is None:
            raise SubscriptionsUnavailable(f"{op}: no connection to {shard}")
        for attempt in (1, 2):
            try:
                return await self._pool.call(shard, op, args, timeout=RPC_TIMEOUT)
            except ShardUnavailable as exc:
                if attempt == 2 or exc.sent:
                    raise SubscriptionsUnavailable(f"{op} on {shard}: {exc}") from exc
                with trio.move_on_after(RECONNECT_GRACE):
                    await self._pool.wait_connected(shard)
            except ShardError as exc:
                raise SubscriptionsUnavailable(f"{op} on {shard}: {exc}") from exc
        raise AssertionError("unreachable")


def _tail_map(raw: object) -> dict[str, str | None]:
    """A peer's [[path, offset or None], ...], checked."""
    if not isinstance(raw, list):
        raise SubscriptionsUnavailable("malformed tails answer")
    out: dict[str, str | None] = {}
    for item in raw:
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise SubscriptionsUnavailable("malformed tails answer")
        path, tail = item
        if not (isinstance(tail, str) or tail is None):
            raise SubscriptionsUnavailable("malformed tails answer")
        out[path] = tail
    return out
