"""Fork RPC to the shard that owns a fork's source: this shard itself, or a peer.

The ring names the source's owner; our own sources are served by a direct call to the
local side (`LocalForks`), others by msgpack RPC over the same multiplexed connections
the gateway uses. Either way a source that cannot act now raises PeerUnavailable, so
callers handle one failure. Answers from a peer are checked before use: a malformed one
is that peer failing, never data.
"""

from __future__ import annotations

from typing import Protocol

import trio

from ds_cluster.common import wire
from ds_cluster.common.ring import RingHolder
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardUnavailable
from ds_cluster.shard.committer import StorageUnavailable, StreamMoving
from ds_cluster.shard.core.model import ForkExport, Record, Response

RPC_TIMEOUT = 30.0
READ_TIMEOUT = 15.0  # an inherited read waits on the source at most this long
RECONNECT_GRACE = 2.0  # a read or export finding the peer unconnected waits this long once
MOVING_GRACE = 3.0  # a source that is moving between shards is retried this long
MOVING_PAUSE = 0.1  # between those tries
# Answers that mean "ask again, maybe elsewhere": the source is moving, or its owner changed.
RETRY_CODES = frozenset({"moving", "misdirected", "version"})


class PeerUnavailable(Exception):
    """The source stream's shard could not act now; the outcome may be unknown."""


class LocalForks(Protocol):
    """The source's side of forks on this shard (shard.forks.ForkCoordinator)."""

    async def export(
        self, source: str, offset: str | None, sub_offset: int, ref: str, content_type: str | None
    ) -> Response | ForkExport: ...

    async def release(self, source: str, ref: str) -> None: ...


def export_to_wire(export: Response | ForkExport) -> wire.Args:
    if isinstance(export, Response):
        return {"ok": False, "s": export.status, "h": list(export.headers), "b": export.body}
    return {
        "ok": True,
        "content_type": export.content_type,
        "ttl": export.ttl,
        "expires_at": export.expires_at,
        "expires_at_ts": export.expires_at_ts,
        "offset": export.offset,
        "sub_offset": export.sub_offset,
        "position": export.position,
    }


def export_from_wire(data: wire.Args) -> Response | ForkExport:
    """A peer's `export_fork` answer, every field checked before use."""
    if not data.get("ok"):
        status, headers, body = data.get("s"), data.get("h", ()), data.get("b", b"")
        if not (
            type(status) is int
            and isinstance(headers, list | tuple)
            and all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in headers)
            and isinstance(body, bytes)
        ):
            raise PeerUnavailable("malformed export_fork answer (a refusal)")
        return Response(status, tuple((str(k), str(v)) for k, v in headers), body)
    missing = [name for name in _EXPORT_FIELDS if name not in data]
    if missing:
        raise PeerUnavailable(f"malformed export_fork answer: no {', '.join(missing)}")
    content_type, ttl, expires_at = data["content_type"], data["ttl"], data["expires_at"]
    expires_at_ts, offset = data["expires_at_ts"], data["offset"]
    sub_offset, position = data["sub_offset"], data["position"]
    if not (
        isinstance(content_type, str)
        and (ttl is None or type(ttl) is int)
        and (expires_at is None or isinstance(expires_at, str))
        and (expires_at_ts is None or isinstance(expires_at_ts, int | float))
        and isinstance(offset, str)
        and type(sub_offset) is int
        and type(position) is int
        and position >= 0
    ):
        raise PeerUnavailable("malformed export_fork answer")
    return ForkExport(
        content_type=content_type,
        ttl=ttl,
        expires_at=expires_at,
        expires_at_ts=expires_at_ts,
        offset=offset,
        sub_offset=sub_offset,
        position=position,
    )


_EXPORT_FIELDS = (
    "content_type",
    "ttl",
    "expires_at",
    "expires_at_ts",
    "offset",
    "sub_offset",
    "position",
)


def records_to_wire(records: list[Record]) -> wire.Args:
    return {"records": [[r.start, r.end, r.data] for r in records]}


def records_from_wire(data: wire.Args) -> list[Record]:
    """The records of a `read_fork` answer, checked: in order, each [start, end, bytes]."""
    raw = data.get("records")
    if not isinstance(raw, list):
        raise PeerUnavailable("malformed read_fork answer")
    records: list[Record] = []
    previous = -1
    for item in raw:
        if not (isinstance(item, list | tuple) and len(item) == 3):
            raise PeerUnavailable("malformed read_fork record")
        start, end, payload = item
        if not (
            type(start) is int
            and type(end) is int
            and isinstance(payload, bytes)
            and previous <= start < end
        ):
            raise PeerUnavailable("malformed read_fork record")
        records.append(Record(start, end, payload))
        previous = end
    return records


async def call_peer(
    pool: ShardPool | None, owner: str, op: str, args: wire.Args, timeout: float = RPC_TIMEOUT
) -> wire.Args:
    """One op on the peer `owner`; PeerUnavailable (naming the error code, if any) when
    it cannot answer or refuses."""
    if pool is None:
        raise PeerUnavailable(f"{op} on {owner}: no peers configured")
    try:
        result = await pool.call(owner, op, args, timeout=timeout)
    except (ShardUnavailable, ShardError) as exc:
        raise PeerUnavailable(f"{op} on {owner}: {exc}") from exc
    if not isinstance(result, dict):
        raise PeerUnavailable(f"{op} on {owner}: malformed answer")
    return result


def _retryable(exc: PeerUnavailable) -> bool:
    cause = exc.__cause__
    return isinstance(cause, ShardError) and cause.code in RETRY_CODES


class ForkPeers:
    """Routes fork RPCs by the ring. `pool` is None when this shard has no peers."""

    def __init__(
        self, ring: RingHolder, shard_id: str, local: LocalForks, pool: ShardPool | None = None
    ) -> None:
        self._ring = ring
        self._shard_id = shard_id
        self._local = local
        self._pool = pool

    def remote_owner(self, source: str) -> str | None:
        """The peer that owns `source`, or None when this shard does."""
        owner = self._ring.current.owner(source)
        return None if owner == self._shard_id else owner

    async def export_fork(
        self,
        source: str,
        offset: str | None,
        sub_offset: int,
        ref: str,
        content_type: str | None,
    ) -> Response | ForkExport:
        owner = self.remote_owner(source)
        if owner is None:
            try:
                return await self._local.export(source, offset, sub_offset, ref, content_type)
            except (StorageUnavailable, StreamMoving) as exc:
                raise PeerUnavailable(str(exc)) from exc
        args: wire.Args = {
            "source": source,
            "offset": offset,
            "sub_offset": sub_offset,
            "ref": ref,
            "content_type": content_type,
        }
        return export_from_wire(await self._patient_call(source, "export_fork", args))

    async def release_fork(self, source: str, ref: str) -> None:
        owner = self.remote_owner(source)
        if owner is None:
            try:
                await self._local.release(source, ref)
            except (StorageUnavailable, StreamMoving) as exc:
                raise PeerUnavailable(str(exc)) from exc
            return
        await call_peer(self._pool, owner, "release_fork", {"source": source, "ref": ref})

    async def read_fork(
        self, owner: str, source: str, ref: str, position: int, limit: int, max_bytes: int
    ) -> list[Record]:
        """Records of `source` (owned by the peer `owner`) with end > `position` below
        `limit`, read through the fork reference `ref` (at most about `max_bytes`)."""
        args = {
            "source": source,
            "ref": ref,
            "position": position,
            "limit": limit,
            "max_bytes": max_bytes,
        }
        del owner  # routed by the source's path: its owner may change while we ask
        return records_from_wire(await self._patient_call(source, "read_fork", args, READ_TIMEOUT))

    async def _patient_call(
        self, source: str, op: str, args: wire.Args, timeout: float = RPC_TIMEOUT
    ) -> wire.Args:
        """An op on the owner of `source`, patiently: a peer not yet (re)connected (just
        started or restarted) is waited for briefly once, and a source moving between
        shards (or whose owner changed) is asked again, on its owner by the newest ring,
        for up to MOVING_GRACE. Safe for `read_fork`, which changes nothing, and for
        `export_fork`, which counts a reference once per ref."""
        waited = False
        deadline = trio.current_time() + MOVING_GRACE
        while True:
            owner = self.remote_owner(source)
            if owner is None:
                raise PeerUnavailable(f"{source!r} is now this shard's: ask again")
            try:
                return await call_peer(self._pool, owner, op, args, timeout)
            except PeerUnavailable as exc:
                cause = exc.__cause__
                if isinstance(cause, ShardUnavailable) and not cause.sent and not waited:
                    waited = True
                    assert self._pool is not None
                    with trio.move_on_after(RECONNECT_GRACE):
                        await self._pool.wait_connected(owner)
                    continue
                if not _retryable(exc) or trio.current_time() >= deadline:
                    raise
            await trio.sleep(MOVING_PAUSE)
