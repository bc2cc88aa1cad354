"""Transport-level response headers the gateway owns: browser security (PROTOCOL.md 12.7)
and CORS. They are added to every response, gateway errors included; a shard must not send
them (the gateway drops any it does, so they never appear twice).

Values are pre-encoded byte pairs: the hot path only extends a list.
"""

from __future__ import annotations

from ds_cluster.common import wire

ALLOWED_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS")

# Response headers a browser script must be able to read (CORS hides all others except
# the safelisted Cache-Control, Content-Language, Content-Length, Content-Type, Expires,
# Last-Modified, Pragma).
EXPOSED = (
    "Stream-Next-Offset",
    "Stream-Cursor",
    "Stream-Up-To-Date",
    "Stream-Closed",
    "Stream-TTL",
    "Stream-Expires-At",
    "Stream-Seq",
    "Stream-SSE-Data-Encoding",
    "Stream-Forked-From",
    "Stream-Fork-Offset",
    "Producer-Id",
    "Producer-Epoch",
    "Producer-Seq",
    "Producer-Expected-Seq",
    "Producer-Received-Seq",
    "ETag",
    "Location",
    "Retry-After",
    "WWW-Authenticate",
    "X-Request-Id",
)

# Request headers a browser may send cross-origin: what the gateway forwards, the bearer
# token it checks itself (never forwarded), and the request id it logs and echoes.
ALLOWED_REQUEST_HEADERS = tuple(sorted(wire.FORWARDED_HEADERS | {"authorization", "x-request-id"}))

TRANSPORT: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"cross-origin"),
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", ", ".join(EXPOSED).encode()),
)

NO_STORE = (b"cache-control", b"no-store")

PREFLIGHT: tuple[tuple[bytes, bytes], ...] = (
    (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
    (b"access-control-allow-headers", ", ".join(ALLOWED_REQUEST_HEADERS).encode()),
    (b"access-control-max-age", b"86400"),
    (b"allow", ", ".join(ALLOWED_METHODS).encode()),
)

# Shard response headers the gateway never passes on: hop-by-hop ones (the HTTP server
# does the framing) and the transport headers above.
DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "te",
        "proxy-connection",
    }
    | {name.decode() for name, _ in TRANSPORT}
)
