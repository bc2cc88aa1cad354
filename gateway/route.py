"""What a stream request means, decided in one pure function: `route()`.

Both ways a request reaches the stream handler, the native HTTP/1.1 connection and the
ASGI app (HTTP/2, the rest), ask `route()` with the request line and headers, so their
decisions cannot differ. No I/O, no clock, no trio: the handler acts on the `Route` it
returns (forward it, share a live read, answer a control route, refuse it). What is not
pure stays in the handler: the client's token (it depends on the time and on key files)
and everything the shard decides.

Checks are those of any HTTP front end: path shape, method, header well-formedness,
declared body size. The gateway holds no protocol semantics beyond telling which reads
are live (`live=long-poll` and `live=sse`, read the shard's way, percent-encoding
included), so that identical ones can share a shard call.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple
from urllib.parse import unquote_plus

from ds_cluster.common import wire
from ds_cluster.common.paths import PREFIX_BYTES, PathError, stream_path
from ds_cluster.gateway.answers import body_too_large
from ds_cluster.gateway.headers import ALLOWED_METHODS
from ds_cluster.gateway.reserved import RESERVED_PREFIX, is_reserved

# Kinds of request.
APPEND: Final = "append"  # POST
READ: Final = "read"  # GET, not a shared live read (catch-up, or a live value the shard refuses)
LONG_POLL: Final = "long-poll"  # GET ...live=long-poll: may share a shard call
SSE: Final = "sse"  # GET ...live=sse: may share an upstream
HEAD: Final = "head"
CREATE: Final = "create"  # PUT
DELETE: Final = "delete"
PREFLIGHT: Final = "preflight"  # OPTIONS: answered by the gateway (CORS)
CONTROL: Final = "control"  # a reserved `__ds` route (`gateway.reserved`)
REFUSED: Final = "refused"  # bad input: answer `status` with `message`, forward nothing
NOT_OURS: Final = "not-ours"  # outside /v1/stream/: the ASGI control app's

_KIND_OF_METHOD = {"POST": APPEND, "GET": READ, "HEAD": HEAD, "PUT": CREATE, "DELETE": DELETE}
_ALLOWED = frozenset(ALLOWED_METHODS)
PREFIX_LEN = len(PREFIX_BYTES)
# The client's Host is not forwarded: Location is built from the gateway's public base.
_FORWARDED = {name.encode(): name for name in wire.FORWARDED_HEADERS if name != "host"}
_LIST_HEADERS = frozenset({"if-none-match"})  # may repeat; joined with ", "
MAX_CONTENT_LENGTH_DIGITS = 19  # more cannot be a size anyone sends

Forwarded = tuple[tuple[str, str], ...]  # (lowercase name, value), as the shard gets them

# Canonical paths of raw paths seen lately, and whether each is reserved: a gateway meets
# the same streams again and again, and `stream_path` is a good part of a request's cost.
# Bounded: emptied when full.
_PATHS: dict[bytes, tuple[str, bool]] = {}
MAX_CACHED_PATHS = 4096


class RouteConfig(NamedTuple):
    """The gateway settings a route depends on (fixed for the gateway's life)."""

    max_body_bytes: int
    # (("host", public host), ("x-forwarded-proto", scheme)) sent with creates, from which
    # the shard builds Location; () when the gateway has no public base.
    public: Forwarded = ()
    auth: bool = False  # client tokens are checked: a repeated Authorization is refused


class Route(NamedTuple):
    """What one request means. `kind` is one of the module's kinds; the rest is set as
    far as the request got: a REFUSED route has `status` and `message` (and `extra`
    response headers); a NOT_OURS route nothing else."""

    kind: str
    method: str
    path: str = ""  # canonical stream path (`common.paths`)
    query: bytes = b""  # raw, as the client sent it: the shard parses it
    forwarded: Forwarded = ()
    # What identical live reads share a shard call on: (path, raw query, forwarded
    # headers). None for requests that are never shared (SSE reads from `offset=now`
    # or with a percent-encoded query, which start where the stream is when asked).
    key: tuple[Any, ...] | None = None
    authorization: bytes | None = None  # the client's token (checked, never forwarded)
    declared: int | None = None  # Content-Length, when given
    status: int = 0  # REFUSED: the status to answer
    message: str = ""  # REFUSED: why, for the person reading it
    extra: tuple[tuple[bytes, bytes], ...] = ()  # REFUSED: more response headers
    # APPEND: the request's m, p, q and h items packed (`wire.pack_http_head`), once for
    # every append of this head (`StreamHandler.send`), b"" for other kinds.
    head: bytes = b""

    def fields(self, body: bytes) -> dict[str, Any]:
        """The `http` RPC frame's fields for this request."""
        return {
            "m": self.method,
            "p": self.path,
            "q": self.query.decode("latin-1"),
            "h": self.forwarded,
            "b": body,
        }


_ALLOW_HEADER = (b"allow", ", ".join(ALLOWED_METHODS).encode())
# A Route from all its fields at once, without NamedTuple's keyword handling (hot path).
_new = tuple.__new__


def _refused(method: str, status: int, message: str, path: str = "") -> Route:
    return Route(REFUSED, method, path, status=status, message=message)


def route(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]], config: RouteConfig
) -> Route:
    """What the request `method target` with `headers` (lowercase names, as HTTP/1.1 and
    HTTP/2 servers give them) means. Never raises for bad input: a REFUSED route.

    Order of checks: path shape (400), method (405), header well-formedness (400),
    declared size (413)."""
    if not target.startswith(PREFIX_BYTES):
        return Route(NOT_OURS, method)
    raw_path, _, query = target.partition(b"?")
    known = _PATHS.get(raw_path)
    if known is None:
        try:
            path = stream_path(raw_path[PREFIX_LEN:])
        except PathError as exc:
            return _refused(method, 400, str(exc))
        if len(_PATHS) >= MAX_CACHED_PATHS:
            _PATHS.clear()
        known = _PATHS[raw_path] = (path, is_reserved(path))
    path, reserved = known
    kind = _KIND_OF_METHOD.get(method)
    if kind is None:
        if method not in _ALLOWED:
            refused = _refused(method, 405, "method not allowed", path)
            return refused._replace(extra=(_ALLOW_HEADER,))
        return Route(PREFLIGHT, method, path, query)  # OPTIONS
    # Forward only the protocol's headers, well-formed; note the declared length.
    forwarded: list[tuple[str, str]] = []
    declared: int | None = None
    authorization: bytes | None = None
    for name, value in headers:
        key = _FORWARDED.get(name)
        if key is not None:
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                return _refused(method, 400, f"header {key} is not ASCII", path)
            if forwarded:  # (most requests forward one header: nothing to look through)
                for i, (seen, before) in enumerate(forwarded):
                    if seen == key:
                        if key not in _LIST_HEADERS:
                            return _refused(method, 400, f"header {key} given twice", path)
                        forwarded[i] = (key, f"{before}, {text}")
                        break
                else:
                    forwarded.append((key, text))
            else:
                forwarded.append((key, text))
        elif name == b"content-length":
            value = value.strip()
            if not value.isdigit() or len(value) > MAX_CONTENT_LENGTH_DIGITS:
                return _refused(method, 400, "bad Content-Length", path)
            declared = int(value)
        elif name == b"authorization":
            if authorization is not None and config.auth:
                return _refused(method, 400, "header authorization given twice", path)
            authorization = value
    if declared is not None and declared > config.max_body_bytes:
        return _refused(method, 413, body_too_large(config.max_body_bytes), path)
    if kind == CREATE and config.public:  # creates: Location from the public base
        forwarded.extend(config.public)
    fwd = tuple(forwarded)
    if reserved:  # control routes before stream routes
        return _new(
            Route,
            (CONTROL, method, path, query, fwd, None, authorization, declared, 0, "", (), b""),
        )
    share: tuple[Any, ...] | None = None
    if kind == READ and query:
        live = live_mode(query)
        if live == "long-poll":
            kind = LONG_POLL
            share = (path, query, fwd)
        elif live == "sse":
            kind = SSE
            if b"%" not in query and b"offset=now" not in query:
                share = (path, query, fwd)
    head = (
        wire.pack_http_head(method, path, query.decode("latin-1"), fwd) if kind == APPEND else b""
    )
    return _new(
        Route, (kind, method, path, query, fwd, share, authorization, declared, 0, "", (), head)
    )


def native_kind(method: str, target: bytes) -> str | None:
    """How the native HTTP/1.1 route serves a request, from its request line alone:
    "answer" (one whole answer, long-polls included), "stream" (an SSE read) or None (left
    to ASGI: anything outside the prefix, and a GET whose query is percent-encoded, which
    the ASGI path serves with its own, unshared, upstream)."""
    if not target.startswith(PREFIX_BYTES):
        return None
    if method != "GET" or target.startswith(RESERVED_PREFIX):
        return "answer"
    query = target.partition(b"?")[2]
    if b"%" in query:
        return None
    return "stream" if live_mode(query) == "sse" else "answer"


def live_mode(query: bytes) -> str | None:
    """The `live` value the shard will read in this query (the last `live` wins; keys and
    values may be percent-encoded), or None."""
    if b"%" in query or b"+" in query:
        return _live_mode_encoded(query)
    if b"live" not in query:
        return None
    live = None
    for part in query.split(b"&"):
        if part[:5] == b"live=":
            live = part[5:]
        elif part == b"live":
            live = b""
    return live.decode("latin-1") if live is not None else None


def _live_mode_encoded(query: bytes) -> str | None:
    """`live_mode` of a query with percent-encoding (or `+`) in it, decoded part by part."""
    live = None
    for part in query.split(b"&"):
        key, _, value = part.decode("latin-1").partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if key == "live":
            live = unquote_plus(value) if "%" in value or "+" in value else value
    return live
