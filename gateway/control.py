"""The gateway's own endpoints (everything outside /v1/stream/), on quart-trio.

GET /healthz: 200 while the process serves. GET /readyz: 200 once every shard of the ring
is connected, authenticated, on our ring version and reports healthy storage; else 503
naming each shard that is not, with the reason (`{"ready": false, "shards": {"shard-1":
"authentication failed"}, "disconnected": ["shard-1"]}`), so a load balancer keeps the
gateway out of rotation and an operator sees why. GET /metrics: the gateway's and every
shard's metrics in the Prometheus text format (`gateway.metrics`; 404 with
--no-metrics). Every response carries the transport headers. Any other path, or another
method, gets a plain-text error like every other error of the gateway (not the
framework's HTML page).
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from ds_cluster.common.rpc_client import ShardPool
from ds_cluster.gateway import metrics as gateway_metrics
from ds_cluster.gateway.answers import error_answer
from ds_cluster.gateway.headers import NO_STORE, TRANSPORT

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

    @app.get("/metrics")
    async def metrics() -> Response:
        recorder = gateway_metrics.current
        if recorder is None:
            return _plain_error(404, "metrics are off on this gateway (--no-metrics)")
        body = await recorder.scrape()
        return Response(body, status=200, content_type=gateway_metrics.CONTENT_TYPE)

    @app.errorhandler(HTTPException)
    async def plain_text_error(error: HTTPException) -> Response:
        status = error.code or 500
        if isinstance(error, NotFound):
            message = (
                "not found: streams are under /v1/stream/; health at /healthz, /readyz; "
                "metrics at /metrics"
            )
        else:
            message = (error.name or "error").lower()
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            extra = ((b"allow", ", ".join(error.valid_methods).encode()),)
        return _plain_error(status, message, extra)

    @app.after_request
    async def transport_headers(response: Response) -> Response:
        for name, value in _TRANSPORT:
            response.headers.setdefault(name, value)
        return response

    return app


def _plain_error(
    status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> Response:
    """An error as the gateway writes every error (`answers.error_answer`)."""
    _, headers, body = error_answer(status, message, extra)
    return Response(
        body, status=status, headers=Headers([(k.decode(), v.decode()) for k, v in headers])
    )
