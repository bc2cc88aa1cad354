"""The shard's ring: the newest one it has seen, kept in its database.

A shard starts from the newer of the ring in its database and the one on its command
line, and adopts newer rings as they arrive (`ring_set`, a peer's move, a gateway's
`err version` answer). A ring is written to the database before it is adopted, so a
restarted shard never goes back to a ring it has left, and fences the same streams.

With the ring the shard keeps its *sources*: the shards that may still hold streams it
owns under its ring (every other shard of the rings it adopted, until each one said it
holds nothing more for it; see `shard.handoff`). A shard of a fresh cluster (version 1,
nothing in its database) has none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import msgpack
import trio

from ds_cluster.common.ring import Endpoint, Ring, RingHolder, format_endpoint, parse_listen
from ds_cluster.shard.committer import Committer, Job
from ds_cluster.shard.store import StorageUnavailable, Store, put_meta

log = logging.getLogger(__name__)

RING_KEY = "ring"
SOURCES_KEY = "sources"

OnChange = Callable[[Ring, Ring], None]  # (old ring, new ring)


def _pack_sources(sources: Mapping[str, Endpoint | None]) -> bytes:
    packed: bytes = msgpack.packb(
        {sid: format_endpoint(ep) if ep else "" for sid, ep in sources.items()},
        use_bin_type=True,
    )
    return packed


def _unpack_sources(blob: bytes) -> dict[str, Endpoint | None]:
    raw = msgpack.unpackb(blob, raw=False)
    return {str(sid): parse_listen(addr) if addr else None for sid, addr in raw.items()}


def _pack_ring(ring: Ring) -> bytes:
    packed: bytes = msgpack.packb(ring.to_wire(), use_bin_type=True)
    return packed


def _others(ring: Ring, me: str) -> dict[str, Endpoint | None]:
    return {sid: ring.endpoints.get(sid) for sid in ring.shard_ids if sid != me}


class ShardRing:
    """The ring holder, its persistence, and the sources that come with it.

    Until `start` (once the database is open) the ring is the command line's; `start`
    then takes the stored one if it is newer."""

    def __init__(self, shard_id: str, command_line: Ring, store: Store) -> None:
        self.shard_id = shard_id
        self._store = store
        self._committer: Committer | None = None
        self._lock = trio.Lock()
        self.on_change: list[OnChange] = []
        self.holder = RingHolder(command_line)
        self.sources: dict[str, Endpoint | None] = {}

    @property
    def current(self) -> Ring:
        return self.holder.current

    def stored_endpoints(self) -> dict[str, Endpoint]:
        """Peer addresses from the database (its ring's and its sources'), for the RPC
        pool built before `start`: a shard restarted mid-move must reach its sources."""
        out: dict[str, Endpoint] = {}
        try:
            blob = self._store.load_meta(RING_KEY)
            if blob:
                out.update(Ring.from_wire(msgpack.unpackb(blob, raw=False)).endpoints)
            blob = self._store.load_meta(SOURCES_KEY)
            if blob:
                out.update({s: ep for s, ep in _unpack_sources(blob).items() if ep})
        except (StorageUnavailable, ValueError, TypeError, msgpack.UnpackException) as exc:
            log.warning("cannot read the stored ring: %s", exc)
        out.pop(self.shard_id, None)
        return out

    def endpoints(self) -> dict[str, Endpoint]:
        """Every peer this shard may have to call: the ring's shards and the sources."""
        out = {sid: ep for sid, ep in self.sources.items() if ep is not None}
        out.update(self.current.endpoints)
        out.pop(self.shard_id, None)
        return out

    async def start(self, committer: Committer) -> None:
        """Start from the newer of the stored ring and the command line's (whose
        addresses win for the shards both name: a restarted cluster may have moved its
        ports), and store it. Raises StorageUnavailable."""
        self._committer = committer
        command_line = self.current
        me = self.shard_id
        blob = self._store.load_meta(RING_KEY)
        try:
            stored = Ring.from_wire(msgpack.unpackb(blob, raw=False)) if blob else None
            sources_blob = self._store.load_meta(SOURCES_KEY)
            sources = _unpack_sources(sources_blob) if sources_blob else {}
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            log.error("the stored ring is unreadable (%s); starting from the command line's", exc)
            stored, sources = None, {}
        if stored is None:
            if command_line.version > 1:  # joining a cluster that has moved on
                sources = _others(command_line, me)
        elif command_line.version > stored.version:
            sources.update(_others(stored, me))
            sources.update(_others(command_line, me))
        async with self._lock:
            self.sources = sources
            if stored is not None and stored.version > command_line.version:
                ring = stored.with_endpoints(command_line.endpoints)
                await self._persist(ring, sources)
                self._take(ring)
            else:
                await self._persist(command_line, sources)

    async def adopt(self, ring: Ring) -> bool:
        """Adopt `ring` if it is newer: stored first, then taken, then announced to the
        `on_change` callbacks. True if it was adopted. Raises StorageUnavailable."""
        async with self._lock:
            old = self.current
            if ring.version <= old.version:
                return False
            ring = ring.with_endpoints({**old.endpoints, **ring.endpoints})
            sources = dict(self.sources)
            sources.update(_others(old, self.shard_id))
            await self._persist(ring, sources)
            self.sources = sources
            self._take(ring)
            return True

    def _take(self, ring: Ring) -> None:
        old = self.current
        self.holder.adopt(ring)
        log.info(
            "adopted ring v%d (%s), was v%d (%s)",
            ring.version,
            ",".join(ring.shard_ids),
            old.version,
            ",".join(old.shard_ids),
        )
        for callback in self.on_change:
            callback(old, ring)

    async def drop_source(self, shard_id: str) -> None:
        """`shard_id` holds nothing more for this shard: stop asking it."""
        async with self._lock:
            if shard_id not in self.sources:
                return
            sources = {sid: ep for sid, ep in self.sources.items() if sid != shard_id}
            await self._persist(self.current, sources)
            self.sources = sources
            log.info("shard %s holds no more streams for this shard", shard_id)

    async def _persist(self, ring: Ring, sources: Mapping[str, Endpoint | None]) -> None:
        assert self._committer is not None, "start() first"
        job = Job(
            statements=[
                put_meta(RING_KEY, _pack_ring(ring)),
                put_meta(SOURCES_KEY, _pack_sources(sources)),
            ]
        )
        await self._committer.submit(job).wait()
