"""Bare-ASGI baseline: hypercorn-trio serving a handler that answers every request with 204.

This is the ceiling of our stack (the gateway is hypercorn-trio too): whatever a real append
costs on top of HTTP parsing and response writing shows up as the distance to this server.
The handler reads the whole body (as a real append must) and answers with a header of the
same shape as an append acknowledgement, so both sides move about the same bytes.

    python -m ds_cluster.tools.bench.baseline --listen 127.0.0.1:PORT [--workers N]

With --workers N > 1, hypercorn's own multi-process runner shares one listening socket.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

_HEADERS = [
    (b"stream-next-offset", b"0000000000000000_0000000000000000"),
    (b"content-length", b"0"),
]
_READ_HEADERS = [(b"content-type", b"application/octet-stream"), (b"content-length", b"0")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Minimal ASGI app: drain the body, answer 204 (POST) or an empty 200 (anything else)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    if scope["method"] == "POST":
        await send({"type": "http.response.start", "status": 204, "headers": _HEADERS})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": _READ_HEADERS})
    await send({"type": "http.response.body", "body": b""})


def main(argv: list[str] | None = None) -> int:
    from hypercorn.config import Config
    from hypercorn.run import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    config = Config()
    config.bind = [args.listen]
    config.worker_class = "trio"
    config.application_path = "ds_cluster.tools.bench.baseline:app"
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.keep_alive_timeout = 60
    # workers == 0 runs in this process (no extra supervisor process to measure).
    config.workers = 0 if args.workers <= 1 else args.workers
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
