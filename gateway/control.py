"""The gateway's own endpoints (everything outside /v1/stream/), on quart-trio.

GET /healthz: 200 while the process serves. GET /readyz: 200 once every shard of the ring
is connected, else 503 naming the ones that are not (a load balancer keeps the gateway out
of rotation until it can route everywhere). Every response carries the transport headers.
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
        missing = pool.disconnected()
        if missing:
            return {"ready": False, "disconnected": missing}, 503
        return {"ready": True}, 200

    @app.after_request
    async def transport_headers(response: Response) -> Response:
        for name, value in _TRANSPORT:
            response.headers.setdefault(name, value)
        return response

    return app
