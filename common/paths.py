"""Stream path validation: from an HTTP request path to the canonical stream path.

The canonical path is what the ring hashes and what shards store: the URL path after
`/v1/stream/`, percent-decoded to UTF-8 ("a/b c"). Anyone who turns a URL path into a
stream path (the gateway for the request line, a shard for `Stream-Forked-From`) must use
`stream_path` so that placement agrees everywhere.

Rules (PROTOCOL.md 12: validate and sanitize stream URLs): non-empty; no empty segments
(so no leading, trailing or doubled `/`); no `.` or `..` segments (before or after
decoding); no control characters (C0, DEL) after decoding; valid UTF-8; at most
MAX_PATH_BYTES bytes once decoded. `%2F` decodes to `/` and therefore becomes a segment
separator: `a%2Fb` and `a/b` name the same stream.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

PREFIX = "/v1/stream/"
PREFIX_BYTES = PREFIX.encode()
MAX_PATH_BYTES = 1024

# Bytes that may appear in a raw path and need no decoding or further checks
# (RFC 3986 pchar without pct-encoded, plus '/'): the fast path.
_PLAIN = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PathError(ValueError):
    """The path is not a valid stream path; the message is safe to show to the client."""


def stream_path(raw: bytes | str) -> str:
    """Canonical stream path from a raw (still percent-encoded) path *without* the prefix.

    Raises PathError with a short client-facing message.
    """
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise PathError("stream path is not valid UTF-8") from None
    if not raw:
        raise PathError("empty stream path")
    if len(raw) <= MAX_PATH_BYTES and _PLAIN.match(raw):
        decoded = raw
    else:
        if len(raw) > 3 * MAX_PATH_BYTES:  # cannot decode to within the limit
            raise PathError("stream path too long")
        decoded = unquote_to_bytes(raw)
        if len(decoded) > MAX_PATH_BYTES:
            raise PathError("stream path too long")
    try:
        path = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("stream path is not valid UTF-8") from None
    if decoded is not raw and _CONTROL.search(path):
        raise PathError("control character in stream path")
    _check_segments(path)
    return path


def check_canonical(path: str) -> None:
    """Refuse a decoded stream path that `stream_path` could not have produced (for
    receivers of already-decoded paths, such as a shard reading RPC requests)."""
    if not path:
        raise PathError("empty stream path")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise PathError("stream path too long")
    if _CONTROL.search(path):
        raise PathError("control character in stream path")
    _check_segments(path)


def _check_segments(path: str) -> None:
    for segment in path.split("/"):
        if not segment:
            raise PathError("empty segment in stream path")
        if segment == "." or segment == "..":
            raise PathError("dot segment in stream path")


def stream_path_from_url(url_path: bytes | str) -> str:
    """Canonical stream path from a full URL path such as `/v1/stream/a/b`.

    For header values that name a stream (`Stream-Forked-From`). A query string or
    fragment is not allowed.
    """
    if isinstance(url_path, str):
        url_path = url_path.encode("utf-8", "surrogateescape")
    if not url_path.startswith(PREFIX_BYTES):
        raise PathError(f"stream URL must start with {PREFIX}")
    rest = url_path[len(PREFIX_BYTES) :]
    if b"?" in rest or b"#" in rest:
        raise PathError("stream URL must not carry a query or fragment")
    return stream_path(rest)
