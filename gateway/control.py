"""The gateway's own endpoints (everything outside /v1/stream/), on quart-trio.

GET /healthz: 200 while the process serves. GET /readyz: 200 once every shard of the
newest ring is connected, authenticated and reports healthy storage; else 503
naming each shard that is not, with the reason (`{"ready": false, "shards": {"shard-1":
"authentication failed"}, "disconnected": ["shard-1"]}`), so a load balancer keeps the
gateway out of rotation and an operator sees why. GET /metrics: the gateway's and every
shard's metrics in the Prometheus text format (`gateway.metrics`; 404 with
--no-metrics). GET /cluster/status: the gateway's ring and each of its shards' address,
ring version, streams, bytes and moves (`move_status`), for `ds-cluster status --url`.
Every response carries the transport headers. Any other path, or another
method, gets a plain-text error like every other error of the gateway (not the
framework's HTML page).
"""

from __future__ import annotations

import trio
from quart import Response
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from ds_cluster.common.ring import Ring, format_endpoint
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardUnavailable
from ds_cluster.gateway import metrics as gateway_metrics
from ds_cluster.gateway.answers import error_answer
from ds_cluster.gateway.headers import NO_STORE, TRANSPORT

_TRANSPORT = [(name.decode(), value.decode()) for name, value in (*TRANSPORT, NO_STORE)]
STATUS_TIMEOUT = 5.0  # seconds a shard gets to answer move_status for /cluster/status


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

    @app.get("/cluster/status")
    async def cluster_status() -> tuple[dict, int]:
        # A gateway meets newer rings through its traffic; an idle one may not have yet.
        # A shard's answer carrying a newer ring is taken, and that ring's shards asked.
        for _ in range(3):
            ring = pool.ring
            shards, newest = await _ask_move_status(pool, ring)
            if newest is None or not pool.adopt(newest):
                break
        return {"ring": ring.to_wire(), "shards": dict(sorted(shards.items()))}, 200

    @app.errorhandler(HTTPException)
    async def plain_text_error(error: HTTPException) -> Response:
        status = error.code or 500
        if isinstance(error, NotFound):
            message = (
                "not found: streams are under /v1/stream/; health at /healthz, /readyz; "
                "metrics at /metrics; cluster status at /cluster/status"
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


def _move_status(answer: dict[str, object]) -> dict[str, object]:
    """The fields of a shard's `move_status` answer that a status shows, type-checked (a
    shard's answer is not passed on unread); ValueError if one is malformed."""
    ring, out = answer.get("ring"), answer.get("moving_out")
    counts = {name: answer.get(name) for name in ("streams", "bytes", "pending_in")}
    if type(out) is dict:
        counts["moving_out.streams"], counts["moving_out.bytes"] = (
            out.get("streams"),
            out.get("bytes"),
        )
    if (
        type(ring) is not dict
        or type(ring.get("version")) is not int
        or type(out) is not dict
        or not all(type(v) is int and v >= 0 for v in counts.values())
        or type(answer.get("done")) is not bool
    ):
        raise ValueError("malformed move_status answer")
    return {
        "ring_version": ring["version"],
        "streams": counts["streams"],
        "bytes": counts["bytes"],
        "moving_out": {"streams": out["streams"], "bytes": out["bytes"]},
        "pending_in": counts["pending_in"],
        "done": answer["done"],
    }


async def _ask_move_status(
    pool: ShardPool, ring: Ring
) -> tuple[dict[str, dict[str, object]], Ring | None]:
    """Each shard of `ring`'s `move_status` (or the error), and the newest ring any of them
    holds if newer than `ring`."""
    shards: dict[str, dict[str, object]] = {}
    newer: list[Ring] = []

    async def ask(shard_id: str) -> None:
        address = ring.endpoints.get(shard_id)
        entry: dict[str, object] = {"address": format_endpoint(address) if address else ""}
        shards[shard_id] = entry
        try:
            if shard_id in pool.connections:  # a shard just met may still be connecting
                with trio.move_on_after(STATUS_TIMEOUT):
                    await pool.wait_connected(shard_id)
            answer = await pool.call(shard_id, "move_status", {}, STATUS_TIMEOUT)
            entry.update(_move_status(answer))
            held = Ring.from_wire(answer.get("ring"))
        except (ShardUnavailable, ShardError, ValueError) as exc:
            entry["error"] = str(exc)
            return
        if held.version > ring.version:
            newer.append(held)

    async with trio.open_nursery() as nursery:
        for shard_id in ring.shard_ids:
            nursery.start_soon(ask, shard_id)
    return shards, max(newer, key=lambda r: r.version, default=None)
