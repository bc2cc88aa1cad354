"""The gateway's ASGI callable: /v1/stream/* to the lean stream handler, the rest to the
quart-trio control app (health, readiness; lifespan too)."""

from __future__ import annotations

from typing import Any

import trio

from ds_cluster.common.paths import PREFIX_BYTES
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import ShardPool
from ds_cluster.gateway.control import create_control_app
from ds_cluster.gateway.stream import Receive, Scope, Send, StreamHandler


def create_app(
    pool: ShardPool, ring: Ring, max_body_bytes: int, nursery: trio.Nursery, public_url: str = ""
) -> tuple[Any, StreamHandler]:
    """The ASGI app and its stream handler (which the native route, `gateway.native`,
    also calls directly for most requests). `nursery` (gateway lifetime) hosts the
    live-read calls shared between clients; `public_url` is where clients reach the
    gateway (for Location)."""
    stream = StreamHandler(pool, ring, max_body_bytes, nursery, public_url)
    control = create_control_app(pool)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope.get("raw_path") or scope["path"].encode()).startswith(
            PREFIX_BYTES
        ):
            await stream(scope, receive, send)
        else:
            # The same ASGI messages: Quart types them as hypercorn's TypedDicts, the
            # stream route as plain dicts.
            await control(scope, receive, send)  # type: ignore[arg-type]

    return app, stream
