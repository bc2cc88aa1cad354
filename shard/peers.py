"""Fork RPC to the shard that owns a fork's source: this shard itself, or a peer.

Mirrors the seed's ForkPeer (`getByName(src).exportFork / releaseFork`) with msgpack RPC
over the same multiplexed connections the gateway uses.
"""

from __future__ import annotations

from typing import Any

from common.rpc_client import ShardError, ShardPool, ShardUnavailable
from shard.core.model import ForkExport, Record, Response
from shard.service import LocalPeers, PeerUnavailable, ShardService

RPC_TIMEOUT = 30.0


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


class RemotePeers:
    """Routes fork RPCs by the ring: local calls for our own sources, RPC otherwise."""

    def __init__(self, service: ShardService, pool: ShardPool) -> None:
        self._service = service
        self._local = LocalPeers(service)
        self._pool = pool

    async def export_fork(
        self,
        source: str,
        offset: str | None,
        sub_offset: int,
        ref: str,
        content_type: str | None,
    ) -> Response | ForkExport:
        owner = self._service.ring.owner(source)
        if owner == self._service.shard_id:
            return await self._local.export_fork(source, offset, sub_offset, ref, content_type)
        args = {
            "source": source,
            "offset": offset,
            "sub_offset": sub_offset,
            "ref": ref,
            "content_type": content_type,
        }
        return export_from_wire(await self._call(owner, "export_fork", args))

    async def release_fork(self, source: str, ref: str) -> None:
        owner = self._service.ring.owner(source)
        if owner == self._service.shard_id:
            await self._local.release_fork(source, ref)
            return
        await self._call(owner, "release_fork", {"source": source, "ref": ref})

    async def _call(self, owner: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._pool.call(owner, op, args, timeout=RPC_TIMEOUT)
        except (ShardUnavailable, ShardError) as exc:
            raise PeerUnavailable(f"{op} on {owner}: {exc}") from exc
