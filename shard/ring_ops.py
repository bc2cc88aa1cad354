"""The shard's ring and move ops: what `rpc_ops.handlers` serves for live rings.

Admin ops (any authenticated cluster member): `ring_get`, `ring_set` (adopt a newer
ring: stored before the answer, pushed on to the other shards, moves started) and
`move_status`. Between shards only: `move_query`, `move_begin`, `move_chunk`,
`move_finish` (see shard/handoff.py). Every move op carries its sender's ring, which the
receiver adopts first if it is newer, and the sender's id (`from`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ds_cluster.common import wire
from ds_cluster.common.paths import PathError, check_canonical
from ds_cluster.shard.handoff import chunk_from_wire, state_from_wire
from ds_cluster.shard.service import ShardService

Handler = Callable[[wire.Args], Awaitable[wire.Args]]


def _path(args: wire.Args, required: bool = True) -> str | None:
    path = args.get("path")
    if path is None and not required:
        return None
    if not isinstance(path, str):
        raise wire.BadArguments("missing stream path")
    try:
        check_canonical(path)
    except PathError as exc:
        raise wire.BadArguments(str(exc)) from None
    return path


def _sender(args: wire.Args) -> str:
    sender = args.get("from")
    if not isinstance(sender, str) or not 0 < len(sender) <= 200:
        raise wire.BadArguments("missing sender id ('from')")
    return sender


def ring_handlers(service: ShardService) -> dict[str, Handler]:
    """The ring and move ops of `service`."""
    handoff = service.handoff

    async def ring_get(args: wire.Args) -> wire.Args:
        return {"ring": service.ring.to_wire()}

    async def ring_set(args: wire.Args) -> wire.Args:
        await handoff.take_ring(args.get("ring"))
        return {"ring": service.ring.to_wire()}

    async def move_status(args: wire.Args) -> wire.Args:
        return handoff.status()

    async def move_query(args: wire.Args) -> wire.Args:
        sender = _sender(args)
        await handoff.take_ring(args.get("ring"))
        version = args.get("version")
        if version is not None and type(version) is not int:
            raise wire.BadArguments("move_query: version is not an integer")
        return await handoff.query(sender, _path(args, required=False), version)

    async def move_begin(args: wire.Args) -> wire.Args:
        sender, path = _sender(args), _path(args)
        assert path is not None
        sent = await handoff.take_ring(args.get("ring"))
        return await handoff.begin(sender, sent.version, path)

    async def move_chunk(args: wire.Args) -> wire.Args:
        sender, path = _sender(args), _path(args)
        assert path is not None
        await handoff.take_ring(args.get("ring"))
        return await handoff.chunk(sender, path, chunk_from_wire(args))

    async def move_finish(args: wire.Args) -> wire.Args:
        sender, path = _sender(args), _path(args)
        assert path is not None
        sent = await handoff.take_ring(args.get("ring"))
        state, refs, end = state_from_wire(path, args)
        return await handoff.finish(sender, sent.version, path, state, refs, end)

    return {
        "ring_get": ring_get,
        "ring_set": ring_set,
        "move_status": move_status,
        "move_query": move_query,
        "move_begin": move_begin,
        "move_chunk": move_chunk,
        "move_finish": move_finish,
    }
