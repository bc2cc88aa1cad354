"""The msgpack RPC wire format spoken between gateways and shards, and between shards.

A connection carries length-prefixed frames: a 4-byte big-endian length, then one
msgpack map. Every map carries the wire version (`v`) and a kind (`k`); requests carry a
caller-chosen id (`i`) that every reply to them repeats, so many requests share one
connection and replies may come back in any order.

Kinds (fields beyond v, k, i):

  hello   caller -> shard, first frame:  role ("gateway" | "shard"), id (caller name),
          ring ({"version", "shards"}).   Shard answers with a `hello` carrying its own
          id and ring; a caller on another ring version is told so, not refused.
  req     op (see OPS), r (caller's ring version), and per op:
            op="http":         m method, p stream path (no /v1/stream/ prefix),
                               q raw query string, h [[lower-name, value], ...], b body
            op="export_fork":  a {"source", "offset", "sub_offset", "ref", "content_type"}
            op="release_fork": a {"source", "ref"}
            op="ping":         a {}  -- liveness probe sent every second or so by
                               common.rpc_client; answer `res` with a {} at once. Any
                               answer (even `err`) proves the peer alive; none within a
                               few seconds and the caller drops the connection.
  res     s status, h [[name, value], ...], b body bytes, more (bool: body chunks follow)
          For non-http ops the result map is in `a`.
  chunk   b body bytes, more (bool)             -- streaming bodies (SSE)
  cancel  (caller -> shard) the caller gave up on request i; the shard stops its work
  err     code (see ERROR_CODES), msg           -- request i failed before any `res`

A shard that does not own a path under the caller's ring answers status 421 with code
"misdirected"; a malformed frame closes the connection (other connections unaffected).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

WIRE_VERSION = 1
MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")

OPS = ("http", "export_fork", "release_fork", "ping")
ERROR_CODES = ("bad_request", "misdirected", "unavailable", "internal", "version")

# Request headers the gateway forwards to shards; everything else is transport-level.
FORWARDED_HEADERS = frozenset(
    {
        "content-type",
        "host",
        "if-none-match",
        "stream-ttl",
        "stream-expires-at",
        "stream-seq",
        "stream-closed",
        "stream-forked-from",
        "stream-fork-offset",
        "stream-fork-sub-offset",
        "producer-id",
        "producer-epoch",
        "producer-seq",
    }
)


class WireError(Exception):
    """The peer sent something that is not a valid frame; drop the connection."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack body. `v` is added when missing."""
    message.setdefault("v", WIRE_VERSION)
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, take whole messages out.

    Sans-IO, so the same code serves the gateway, the shard and the tests.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        # Frames are decoded straight out of `data` (no copy) unless a partial frame is
        # pending; only an incomplete tail is kept.
        buf = self._buffer
        if buf:
            buf += data
            source: bytes | bytearray = buf
        else:
            source = data
        messages: list[dict[str, Any]] = []
        size = len(source)
        pos = 0
        with memoryview(source) as view:
            while size - pos >= 4:
                (length,) = _HEADER.unpack_from(view, pos)
                if length > self._max_frame:
                    raise WireError(f"frame length {length} exceeds limit")
                start = pos + 4
                if size - start < length:
                    break
                pos = start + length
                messages.append(_decode(view[start:pos]))
        if source is buf:
            del buf[:pos]
        elif pos < size:
            buf += data[pos:]
        return messages


def _decode(body: memoryview) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"undecodable frame: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("k"), str):
        raise WireError("frame is not a message map")
    if message.get("v") != WIRE_VERSION:
        raise WireError(f"unsupported wire version {message.get('v')!r}")
    return message
