"""The gateway's ASGI callable: /v1/stream/* to the lean stream handler, the rest to the
quart-trio control app (health, readiness; lifespan too). With `--auth-metrics`, /metrics
needs a token with the `metrics` right; health and readiness stay open."""

from __future__ import annotations

from time import time
from typing import Any

import trio

from ds_cluster.common.paths import PREFIX_BYTES
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import ShardPool
from ds_cluster.gateway.answers import Answer
from ds_cluster.gateway.auth import Denied
from ds_cluster.gateway.auth_files import AuthFiles
from ds_cluster.gateway.body_cache import DEFAULT_BYTES
from ds_cluster.gateway.control import create_control_app
from ds_cluster.gateway.stream import (
    Receive,
    Scope,
    Send,
    StreamHandler,
    denied_answer,
    send_answer,
)

METRICS_PATH = "/metrics"


def create_app(
    pool: ShardPool,
    ring: Ring,
    max_body_bytes: int,
    nursery: trio.Nursery,
    public_url: str = "",
    auth: AuthFiles | None = None,
    body_cache_bytes: int = DEFAULT_BYTES,
) -> tuple[Any, StreamHandler]:
    """The ASGI app and its stream handler (which the native route, `gateway.http1`,
    also calls directly for most requests). `nursery` (gateway lifetime) hosts the
    live-read calls shared between clients; `public_url` is where clients reach the
    gateway (for Location); `auth`: client tokens, when they are required;
    `body_cache_bytes`: large catch-up bodies kept (`gateway.body_cache`)."""
    stream = StreamHandler(pool, ring, max_body_bytes, nursery, public_url, auth, body_cache_bytes)
    control = create_control_app(pool)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope.get("raw_path") or scope["path"].encode()).startswith(
            PREFIX_BYTES
        ):
            await stream(scope, receive, send)
        else:
            if auth is not None and auth.protect_metrics and scope.get("path") == METRICS_PATH:
                refused = _metrics_refusal(auth, scope)
                if refused is not None:
                    return await send_answer(send, refused)
            # The same ASGI messages: Quart types them as hypercorn's TypedDicts, the
            # stream route as plain dicts.
            await control(scope, receive, send)  # type: ignore[arg-type]

    return app, stream


def _metrics_refusal(auth: AuthFiles, scope: Scope) -> Answer | None:
    """None when the request's token has the `metrics` right; else its 401 / 403."""
    values = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
    decision = auth.current().decide_metrics(values[0] if len(values) == 1 else None, time())
    return denied_answer(decision) if type(decision) is Denied else None
