"""The shard's non-http RPC ops: argument validation, then a call into the service.

`RpcServer` serves `http` and `ping` itself and looks every other op up in the mapping
`handlers()` builds, so a new op is one function here. A handler gets the request's
argument map (already known to be a dict, nothing else checked) and returns the result
map sent back in `res.a`. It raises `wire.BadArguments` for arguments it cannot use
(answered `err bad_request`) and `wire.Misdirected` for a path this shard does not own;
storage and peer failures propagate and are answered `err unavailable`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ds_cluster.common import wire
from ds_cluster.shard.metrics import ShardMetrics
from ds_cluster.shard.peers import export_to_wire, records_to_wire
from ds_cluster.shard.ring_ops import ring_handlers
from ds_cluster.shard.service import ShardService
from ds_cluster.shard.subscriptions import ops as subscription_ops

Handler = Callable[[wire.Args], Awaitable[wire.Args]]


def handlers(service: ShardService) -> dict[str, Handler]:
    """The op -> handler registry the RPC server dispatches on."""
    shard_metrics = ShardMetrics(service.counters, service.committer)

    async def export_fork(args: wire.Args) -> wire.Args:
        source, offset, sub_offset, ref, content_type = (
            args.get("source"),
            args.get("offset"),
            args.get("sub_offset", 0),
            args.get("ref"),
            args.get("content_type"),
        )
        if not (
            isinstance(source, str)
            and (offset is None or isinstance(offset, str))
            and type(sub_offset) is int
            and isinstance(ref, str)
            and (content_type is None or isinstance(content_type, str))
        ):
            raise wire.BadArguments("malformed export_fork arguments")
        export = await service.forks.export(source, offset, sub_offset, ref, content_type)
        return export_to_wire(export)

    async def release_fork(args: wire.Args) -> wire.Args:
        source, ref = args.get("source"), args.get("ref")
        if not (isinstance(source, str) and isinstance(ref, str)):
            raise wire.BadArguments("malformed release_fork arguments")
        if not service.owns(source):
            raise wire.Misdirected("not the owner of the source")
        await service.forks.release(source, ref)
        return {"ok": True}

    async def read_fork(args: wire.Args) -> wire.Args:
        """A fork's inherited read: only for a reference held on that source."""
        source, ref = args.get("source"), args.get("ref")
        position, limit, max_bytes = args.get("position"), args.get("limit"), args.get("max_bytes")
        if not (
            isinstance(source, str)
            and isinstance(ref, str)
            and type(position) is int
            and type(limit) is int
            and type(max_bytes) is int
            and position >= 0
            and max_bytes > 0
        ):
            raise wire.BadArguments("malformed read_fork arguments")
        if not service.owns(source):
            raise wire.Misdirected("not the owner of the source")
        records = await service.forks.serve_read(source, ref, position, limit, max_bytes)
        if records is None:
            raise wire.BadArguments("no such fork reference on this source")
        return records_to_wire(records)

    async def metrics(args: wire.Args) -> wire.Args:
        """This shard's metric samples, for a gateway's /metrics (`shard.metrics`)."""
        return {"families": shard_metrics.samples()}

    return {
        **ring_handlers(service),
        "export_fork": export_fork,
        "release_fork": release_fork,
        "read_fork": read_fork,
        "metrics": metrics,
        **subscription_ops.handlers(service.subs, service.sub_mover, service.handoff.take_ring),
    }
