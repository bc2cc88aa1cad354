"""Fork RPC to the shard that owns a fork's source: this shard itself, or a peer.

Mirrors the seed's ForkPeer (`getByName(src).exportFork / releaseFork`): the ring names
the source's owner; our own sources are served by a direct call, others by msgpack RPC
over the same multiplexed connections the gateway uses. Either way a source that cannot
act now raises PeerUnavailable, so callers handle one failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.rpc_client import ShardError, ShardPool, ShardUnavailable
from shard.committer import StorageUnavailable
from shard.core.model import ForkExport, Record, Response

if TYPE_CHECKING:
    from shard.service import ShardService

RPC_TIMEOUT = 30.0


class PeerUnavailable(Exception):
    """The source stream's shard could not act now; the outcome may be unknown."""


def export_to_wire(export: Response | ForkExport) -> dict[str, Any]:
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
        "records": [[r.start, r.end, r.data] for r in export.records],
    }


def export_from_wire(data: dict[str, Any]) -> Response | ForkExport:
    if not data.get("ok"):
        return Response(
            int(data["s"]),
            tuple((str(k), str(v)) for k, v in data.get("h", ())),
            data.get("b", b""),
        )
    return ForkExport(
        content_type=data["content_type"],
        ttl=data["ttl"],
        expires_at=data["expires_at"],
        expires_at_ts=data["expires_at_ts"],
        offset=data["offset"],
        sub_offset=data["sub_offset"],
        position=data["position"],
        records=tuple(Record(start, end, payload) for start, end, payload in data["records"]),
    )


class ForkPeers:
    """Routes fork RPCs by the ring. `pool` is None for a single-shard ring."""

    def __init__(self, service: ShardService, pool: ShardPool | None = None) -> None:
        self._service = service
        self._pool = pool

    def _remote_owner(self, source: str) -> str | None:
        owner = self._service.ring.owner(source)
        return None if owner == self._service.shard_id or self._pool is None else owner

    async def export_fork(
        self,
        source: str,
        offset: str | None,
        sub_offset: int,
        ref: str,
        content_type: str | None,
    ) -> Response | ForkExport:
        owner = self._remote_owner(source)
        if owner is None:
            try:
                return await self._service.export_fork(
                    source, offset, sub_offset, ref, content_type
                )
            except StorageUnavailable as exc:
                raise PeerUnavailable(str(exc)) from exc
        args = {
            "source": source,
            "offset": offset,
            "sub_offset": sub_offset,
            "ref": ref,
            "content_type": content_type,
        }
        return export_from_wire(await self._call(owner, "export_fork", args))

    async def release_fork(self, source: str, ref: str) -> None:
        owner = self._remote_owner(source)
        if owner is None:
            try:
                await self._service.release_fork(source, ref)
            except StorageUnavailable as exc:
                raise PeerUnavailable(str(exc)) from exc
            return
        await self._call(owner, "release_fork", {"source": source, "ref": ref})

    async def _call(self, owner: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        assert self._pool is not None
        try:
            return await self._pool.call(owner, op, args, timeout=RPC_TIMEOUT)
        except (ShardUnavailable, ShardError) as exc:
            raise PeerUnavailable(f"{op} on {owner}: {exc}") from exc
