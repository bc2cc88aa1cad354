"""The subscription RPC ops: arguments checked, then a call into `Subscriptions`.

sub_http        a gateway's request under `__ds/` (m, p, auth, base, b), answered
                {s, h, b}; sent to the owner of the subscription (or any shard for
                the JWK Set)
sub_register    owner -> every shard (a pattern) or a path's owner (explicit links):
                store the registration; answer the tails of the streams it names here
sub_unregister  owner -> shards: drop a subscription's registrations
sub_notify      a stream's shard -> a subscription's owner: new tails
sub_tails       owner -> a stream's shard: current tails of some paths
move_sub        old owner -> new owner, when the ring changes: a subscription's whole
                state (ring, from, sub), answered {status: done} once committed
                (shard/subscriptions/move.py)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ds_cluster.common import wire
from ds_cluster.common.paths import PathError, check_canonical
from ds_cluster.shard.subscriptions import Subscriptions
from ds_cluster.shard.subscriptions.move import SubMover
from ds_cluster.shard.subscriptions.owner import (
    SubArriving,
    SubElsewhere,
    SubscriptionsUnavailable,
)

Handler = Callable[[wire.Args], Awaitable[wire.Args]]
MAX_ITEMS = 100_000


def _paths(raw: object, op: str) -> list[str]:
    if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
        raise wire.BadArguments(f"{op}: paths must be a list")
    for path in raw:
        if not isinstance(path, str):
            raise wire.BadArguments(f"{op}: paths must be strings")
        try:
            check_canonical(path)
        except PathError as exc:
            raise wire.BadArguments(f"{op}: {exc}") from None
    return raw


def _sub_id(raw: object, op: str) -> str:
    if not isinstance(raw, str) or not raw or len(raw) > 1024:
        raise wire.BadArguments(f"{op}: sub must be a subscription id")
    return raw


def handlers(
    subs: Subscriptions,
    mover: SubMover | None = None,
    take_ring: Callable[[object], Awaitable[object]] | None = None,
) -> dict[str, Handler]:
    """The ops; `move_sub` only with `mover` and `take_ring` (the sender's ring is
    adopted first, as for the stream moves)."""

    async def sub_http(args: wire.Args) -> wire.Args:
        method, path, auth, base, body = (args.get(k) for k in ("m", "p", "auth", "base", "b"))
        if not (
            isinstance(method, str)
            and isinstance(path, str)
            and path.startswith("__ds/")
            and isinstance(auth, str)
            and isinstance(base, str)
            and isinstance(body, bytes)
        ):
            raise wire.BadArguments("malformed sub_http arguments")
        if not subs.routes_here(path):
            raise wire.Misdirected("not the owner of this subscription")
        try:
            status, headers, out = await subs.owner.http(method, path, auth, base, body)
        except SubElsewhere as exc:
            raise wire.Misdirected(str(exc)) from None
        except SubArriving as exc:
            raise wire.Moving(str(exc)) from None
        return {"s": status, "h": [list(pair) for pair in headers], "b": out}

    async def sub_register(args: wire.Args) -> wire.Args:
        sub_id = _sub_id(args.get("sub"), "sub_register")
        pattern = args.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise wire.BadArguments("sub_register: pattern must be a string")
        tails = await subs.local_register(
            sub_id, pattern, _paths(args.get("paths"), "sub_register")
        )
        return {"tails": [[path, tail] for path, tail in tails.items()]}

    async def sub_unregister(args: wire.Args) -> wire.Args:
        sub_id = _sub_id(args.get("sub"), "sub_unregister")
        raw = args.get("paths")
        paths = None if raw is None else _paths(raw, "sub_unregister")
        await subs.local_unregister(sub_id, paths)
        return {}

    async def sub_notify(args: wire.Args) -> wire.Args:
        raw = args.get("items")
        if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
            raise wire.BadArguments("sub_notify: items must be a list")
        items: list[tuple[str, str, str | None]] = []
        for item in raw:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and (item[2] is None or isinstance(item[2], str))
            ):
                raise wire.BadArguments("sub_notify: each item is [sub, path, tail]")
            items.append((item[0], item[1], item[2]))
        try:
            return {"gone": await subs.owner.notify(items)}
        except SubscriptionsUnavailable as exc:  # some are moving: the notifier retries
            raise wire.Moving(str(exc)) from None

    async def sub_tails(args: wire.Args) -> wire.Args:
        tails = await subs.local_tails(_paths(args.get("paths"), "sub_tails"))
        return {"tails": [[path, tail] for path, tail in tails.items()]}

    async def move_sub(args: wire.Args) -> wire.Args:
        if mover is None or take_ring is None:
            raise wire.BadArguments("move_sub: this shard does not move subscriptions")
        sender = args.get("from")
        if not isinstance(sender, str) or not 0 < len(sender) <= 200:
            raise wire.BadArguments("move_sub: missing sender id ('from')")
        await take_ring(args.get("ring"))
        return await mover.receive(args.get("sub"))

    return {
        "move_sub": move_sub,
        "sub_http": sub_http,
        "sub_register": sub_register,
        "sub_unregister": sub_unregister,
        "sub_notify": sub_notify,
        "sub_tails": sub_tails,
    }
