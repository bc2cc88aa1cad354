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
RAW_BODY_BYTES = 16 * 1024  # bodies from this size are appended to the frame, not packed

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


class OpError(Exception):
    """An op handler refuses a request; answered as an `err` frame of `code`."""

    code = "internal"


class BadArguments(OpError):
    """The op's arguments are missing or of the wrong shape (`err bad_request`)."""

    code = "bad_request"


class Misdirected(OpError):
    """The op names a path this shard does not own (`err misdirected`)."""

    code = "misdirected"


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack body. `v` is added when missing.

    A large `b` (body bytes) is not packed by msgpack, which would copy it into a growing
    buffer and out again: the map is packed with `b` last and the body appended to it,
    which is the same msgpack, with one copy of the body instead of three or four."""
    message.setdefault("v", WIRE_VERSION)
    body = message.get("b")
    if type(body) is bytes and len(body) >= RAW_BODY_BYTES:
        packer = msgpack.Packer(use_bin_type=True)
        head = [packer.pack_map_header(len(message))]
        for key, value in message.items():
            if key != "b":
                head.append(packer.pack(key))
                head.append(packer.pack(value))
        head.append(packer.pack("b"))
        head.append(_bin_header(len(body)))
        size = sum(map(len, head)) + len(body)
        _check_size(size)
        return b"".join([_HEADER.pack(size), *head, body])
    packed = msgpack.packb(message, use_bin_type=True)
    _check_size(len(packed))
    return _HEADER.pack(len(packed)) + packed


def _bin_header(size: int) -> bytes:
    """msgpack's bin 16 / bin 32 header (the Packer has no call for it)."""
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def _check_size(size: int) -> None:
    if size > MAX_FRAME_BYTES:
        raise WireError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")


def coalesce(frames: list[bytes]) -> list[bytes]:
    """What a writer sends for queued `frames`: runs of small frames joined into one
    write, large frames written as they are (joining would copy them once more)."""
    if len(frames) == 1:
        return frames
    out: list[bytes] = []
    run: list[bytes] = []
    for frame in frames:
        if len(frame) >= RAW_BODY_BYTES:
            if run:
                out.append(b"".join(run))
                run = []
            out.append(frame)
        else:
            run.append(frame)
    if run:
        out.append(b"".join(run))
    return out


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, take whole messages out.

    Sans-IO, so the same code serves the gateway, the shard and the tests. Frames are
    decoded straight out of the bytes fed (no copy); the pieces of a frame that spans
    several reads are kept as they came and joined once, when the frame is complete.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._pieces: list[bytes] = []  # an incomplete frame's bytes, as received
        self._have = 0  # their total length
        self._need = 0  # bytes the incomplete frame needs in all (0: not known yet)
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._pieces:
            self._pieces.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._pieces)
            self._pieces = []
            self._have = self._need = 0
        messages: list[dict[str, Any]] = []
        size = len(data)
        pos = 0
        with memoryview(data) as view:
            while size - pos >= 4:
                (length,) = _HEADER.unpack_from(view, pos)
                if length > self._max_frame:
                    raise WireError(f"frame length {length} exceeds limit")
                start = pos + 4
                if size - start < length:
                    self._need = 4 + length
                    break
                pos = start + length
                messages.append(_decode(view[start:pos]))
        if pos < size:
            rest = data[pos:] if pos else data
            self._pieces = [rest]
            self._have = len(rest)
            if size - pos < 4:
                self._need = 4  # not even the length yet
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
