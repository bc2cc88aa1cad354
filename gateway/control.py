"""The gateway's own endpoints (everything outside /v1/stream/), on quart-trio.

GET /healthz: 200 while the process serves. GET /readyz: 200 once every shard of the ring
is connected, authenticated, on our ring version and reports healthy storage; else 503
naming each shard that is not, with the reason (`{"ready": false, "shards": {"shard-1":
"authentication failed"}, "disconnected": ["shard-1"]}`), so a load balancer keeps the
gateway out of rotation and an operator sees why. Every response carries the transport
headers.
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from common.rpc_client import ShardPool
from gateway.headers import NO_STORE, TRANSPORT

_TRANSPORT = [(name.decode(), value.decode()) for name, value in (*TRANSPORT, NO_STORE)]


def create_control_app(pool: ShardPool) -> QuartTrio:
    app = QuartTrio("ds_cluster_gateway")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", status=200, content_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> tuple[dict, int]:
        problems = pool.problems()
        if problems:
            return {"ready": False, "shards": problems, "disconnected": pool.disconnected()}, 503
        return {"ready": True}, 200

    @app.after_request
    async def transport_headers(response: Response) -> Response:
        for name, value in _TRANSPORT:
            response.headers.setdefault(name, value)
        return response

    return app
