"""The reserved `__ds` control routes (PROTOCOL.md section 6), routed before streams.

`/v1/stream/__ds/subscriptions/:id[/...]` goes to the shard that owns subscription `id`
on the ring (it hashes `__ds/subscriptions/:id`, whatever follows), and
`/v1/stream/__ds/jwks.json` to the owner of `__ds/jwks` (every shard holds the same
key; one fixed owner keeps answers alike). The request travels as the `sub_http` op with
its method, path, `Authorization` header (callback and ack tokens), body, and the
gateway's public base URL, from which the owner builds callback and JWKS URLs. As for
streams, the gateway decides nothing: the shard's answer is relayed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardUnavailable
from ds_cluster.gateway.answers import Answer
from ds_cluster.gateway.headers import NO_STORE, TRANSPORT

RESERVED = "__ds"
RESERVED_PREFIX = b"/v1/stream/__ds"
CALL_TIMEOUT = 30.0
_JSON = (b"content-type", b"application/json")


def is_reserved(path: str) -> bool:
    """Whether a canonical stream path is under the reserved prefix."""
    return path == RESERVED or path.startswith("__ds/")


def route_key(path: str) -> str | None:
    """What the ring hashes for a reserved path, or None for an unknown route."""
    if path == "__ds/jwks.json":
        return "__ds/jwks"
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "subscriptions" and parts[2]:
        return f"__ds/subscriptions/{parts[2]}"
    return None


def _json_answer(status: int, body: bytes) -> Answer:
    headers = [_JSON, (b"content-length", b"%d" % len(body)), NO_STORE, *TRANSPORT]
    return status, headers, body


class ReservedRoutes:
    def __init__(
        self,
        pool: ShardPool,
        ring: Callable[[], Ring],
        public_url: str,
        failure: Callable[[Any], Answer],
    ) -> None:
        self._pool = pool
        self._ring = ring
        self._base = public_url.rstrip("/")
        self._failure = failure

    async def answer(
        self, method: str, path: str, authorization: bytes | None, body: bytes
    ) -> Answer:
        """The owner's answer to a control request. `authorization`: the request's
        Authorization header, for the routes that carry the subscription's own token."""
        key = route_key(path)
        if key is None:
            message = b'{"error":{"code":"NOT_FOUND","message":"no such control route"}}'
            return _json_answer(404, message)
        auth = authorization.decode("latin-1") if authorization is not None else ""
        args = {"m": method, "p": path, "auth": auth, "base": self._base, "b": body}
        try:
            result = await self._pool.call_routed(key, "sub_http", args, CALL_TIMEOUT)
        except (ShardUnavailable, ShardError) as exc:
            return self._failure(exc)
        status, pairs, out = result.get("s"), result.get("h"), result.get("b")
        if not (type(status) is int and isinstance(pairs, list) and isinstance(out, bytes)):
            return _json_answer(502, b'{"error":{"code":"BAD_GATEWAY","message":"bad answer"}}')
        rendered: list[tuple[bytes, bytes]] = []
        has_cache = False
        for pair in pairs:
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
                name = pair[0].lower()
                has_cache |= name == "cache-control"
                rendered.append((name.encode("latin-1"), pair[1].encode("latin-1")))
        rendered.extend(TRANSPORT)
        if not has_cache:
            rendered.append(NO_STORE)
        if status != 204:
            rendered.append((b"content-length", b"%d" % len(out)))
        if method == "HEAD":
            out = b""
        return status, rendered, out


_TOKEN_ACTIONS = frozenset({"callback", "ack", "release"})


def own_credentials(method: str, path: str) -> bool:
    """Requests that client auth (`gateway.auth`) does not gate: the public JWK Set, and
    the POSTs a webhook receiver or worker authenticates with the subscription's own
    callback or claim token (`Authorization: Bearer`), which the owning shard checks.
    Only paths under `__ds` qualify: a stream merely shaped like one needs a client token."""
    if path == "__ds/jwks.json":
        return method in ("GET", "HEAD")
    parts = path.split("/")
    return (
        method == "POST"
        and len(parts) == 4
        and parts[0] == RESERVED
        and parts[1] == "subscriptions"
        and parts[3] in _TOKEN_ACTIONS
    )
