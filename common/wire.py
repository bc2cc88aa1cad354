"""The msgpack RPC wire format spoken between gateways and shards, and between shards.

A connection carries length-prefixed frames: a 4-byte big-endian length, then one
msgpack value. Requests carry a caller-chosen id (`i`) that every reply to them repeats,
so many requests share one connection and replies may come back in any order.

The handshake's frames are msgpack maps carrying the wire version (`v`) and a kind (`k`):

  hello   the handshake (see common/cluster_auth.py), caller first:
            caller -> shard: role ("gateway" | "shard"), id (caller name), nonce,
                             r (caller's ring version)
            shard -> caller: role, id (the shard's), nonce, mac (its proof)
  auth    caller -> shard: mac (the caller's proof)
  ready   shard -> caller: ring (a RingInfo: {"version", "shards", "endpoints"}),
          health ({"storage": "ok" | "failed: ..."}); the shard accepts requests
          from here on. Nothing but these
          frames, and none over MAX_HANDSHAKE_FRAME bytes, passes before `ready`: a peer
          that has not proven itself learns nothing, not even the ring.

A peer of another wire version is refused at its hello, with both versions named (and
the version is part of the handshake's proofs), so the frames that follow need not
carry it. They are positional: a msgpack array of a kind tag (a small int) and the
kind's fields in fixed places, exactly as many as the kind has. Unpacking an array costs
less than half of a map of the same fields, and these frames are every request's:

  req     [0, i, r, m, p, q, h, t, b]
                                     an `http` op: r the caller's ring version, m method,
                                     p stream path (no /v1/stream/ prefix), q raw query
                                     string, h [[lower-name, value], ...], t the body
                                     token of a body the caller holds (b"": none), b body
          [1, i, r, op, a]           any other op (see OPS), a its argument map:
            op="ping":         a {}  -- liveness probe sent every second or so by
                               common.rpc_client; answer `res` with a {"health": ...} at
                               once. Any answer (even `err`) proves the peer alive; none
                               within a few seconds and the caller drops the connection.
            any other op:      served by the shard's op registry (shard/rpc_ops.py:
                               export_fork, release_fork, ring_get, ring_set,
                               move_status, metrics, ...), `a` checked against
                               ARG_SCHEMAS first
  res     [2, i, s, more, h, t, hit, b]
                                     an http op's answer: status, more (bool: body
                                     chunks follow), h [[name, value], ...], t the
                                     body's token (b"": none), hit (bool: the body is
                                     the one the request's `t` names, so b is empty
                                     and the caller uses its own copy), b body
          [3, i, a]                  another op's answer: its result map (status 200)
  chunk   [4, i, more, b]            -- streaming bodies (SSE)
  cancel  [5, i]                     (caller -> shard) the caller gave up on request i;
                                     the shard stops its work
  err     [6, i, code, msg, a]       code (see ERROR_CODES), msg, a (a map, or nil)
          -- request i failed before any `res`. None of these codes ran the request:
          "version":     the request's `r` is not the shard's ring version (ops outside
                         RING_FREE_OPS); `a` = {"ring": RingInfo}, the shard's. A caller
                         on an older ring adopts it; one on a newer ring sends the shard
                         `ring_set` with its own. Either way it then retries.
          "misdirected": the shard does not own the path under its ring;
                         `a` = {"ring": RingInfo}: retry on the owner under that ring.
          "moving":      the stream is moving to or from this shard right now;
                         `a` = {"retry_after": seconds}: retry shortly.

Two kinds say the most frequent exchange, a plain append and its 204, in fewer items
(no ten-field request to build and check on each side; see `pack_http_head`):

  append  [7, p, c, i, r, b]         (caller -> shard) the http request [0, i, r, "POST",
                                     p, "", [["content-type", c]], b"", b]: a POST with
                                     no query whose one forwarded header is its
                                     Content-Type. Decoded as its own frame (`k`
                                     "append", fields i, r, p, c, b), served as that
                                     request would be (`general_request`)
  done    [8, i, o]                  (shard -> caller) the `res` [2, i, 204, False,
                                     [["stream-next-offset", o]], b"", False, b""] (any
                                     http request's answer of that shape): decoded as
                                     that very `res`

A body `b` is always its frame's last field, so a large one is written and read apart
from the rest (`encode_parts`, `FrameDecoder`).

A body token (`t`, at most MAX_TOKEN_BYTES, opaque to the caller) names exactly one run
of bytes: equal tokens, equal bodies (shard/slice_cache.py makes them). A caller that
kept a body with its token may send the token back; the shard answers as always, and
only when the body it would send has that very token does it leave it out (`hit`). A
wrong token costs the caller nothing but the whole body.

In memory every frame is a dict keyed by the names above (`k` its kind, and for `res`
of another op s=200, h=[], b=b"", more=False, t=b"", hit=False besides `a`): `encode`
turns one into its frame, and `parse` (in the decoder) checks a received frame against
the schema below before anyone reads a field: a frame of the wrong shape is a
WireError, which closes that connection only.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NotRequired, TypedDict, TypeGuard

import msgpack

from ds_cluster.common import bigjoin

WIRE_VERSION = 6  # 6: append/done (5: body tokens, 4: positional frames, 3: live rings)
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_HANDSHAKE_FRAME = 64 * 1024  # frame size limit until the peer has proven itself
_HEADER = struct.Struct(">I")
_pack_length = _HEADER.pack
_unpack_length = _HEADER.unpack_from
RAW_BODY_BYTES = 16 * 1024  # bodies from this size are appended to the frame, not packed
MAX_TOKEN_BYTES = 64  # a body token's largest size (`t` in http req and res)
Received = bytes | bytearray  # what a trio stream's receive_some returns
Piece = bigjoin.Piece  # a received piece kept by the decoder: as read, or a view into one
Decoded = dict[str, object]  # a map as msgpack decoded it, before `parse` checked it
Positional = list[object]  # a positional frame as msgpack decoded it, before `parse`
Outgoing = list[object]  # a positional frame to send, as common/rpc_core.py builds it

OPS = (
    "http",
    "ping",
    "export_fork",
    "release_fork",
    "read_fork",
    "ring_get",
    "ring_set",
    "move_status",
    "metrics",
    "move_query",
    "move_begin",
    "move_chunk",
    "move_finish",
    "move_sub",
    "sub_http",
    "sub_register",
    "sub_unregister",
    "sub_notify",
    "sub_tails",
)
ERROR_CODES = ("bad_request", "misdirected", "unavailable", "internal", "version", "moving")

# Ops served whatever the caller's ring version: they exist to compare and exchange
# rings, or to watch a move (a shard fences every other op with `err version`).
RING_FREE_OPS = frozenset({"ping", "ring_get", "ring_set", "move_status", "metrics"})

# The argument schema of each non-http op: field -> (accepted type, required). The server
# checks a request's `a` against its op's entry before the handler runs (`check_args`), so
# a new op is one entry here and one handler in shard/rpc_ops.py. Handlers still check
# values (ranges, that a path is canonical) the types cannot say.
ARG_SCHEMAS: dict[str, dict[str, tuple[type, bool]]] = {
    # subscriptions (shard/subscriptions/ops.py): a gateway's __ds request, and between
    # a subscription's owner and the shards that own its streams
    "sub_http": {
        "m": (str, True),
        "p": (str, True),
        "auth": (str, True),
        "base": (str, True),
        "b": (bytes, True),
    },
    "sub_register": {"sub": (str, True), "pattern": (str, False), "paths": (list, True)},
    "sub_unregister": {"sub": (str, True), "paths": (list, False)},
    "sub_notify": {"items": (list, True)},
    "sub_tails": {"paths": (list, True)},
    "ring_get": {},
    "ring_set": {"ring": (dict, True)},
    "move_status": {},
    "metrics": {},
    # between shards, moving streams (shard/handoff.py); each carries the sender's ring
    "move_query": {
        "ring": (dict, True),
        "from": (str, True),
        "path": (str, False),
        "version": (int, False),
    },
    "move_begin": {"ring": (dict, True), "from": (str, True), "path": (str, True)},
    # a subscription's whole state to its new owner (shard/subscriptions/move.py)
    "move_sub": {"ring": (dict, True), "from": (str, True), "sub": (str, True)},
    "move_chunk": {
        "ring": (dict, True),
        "from": (str, True),
        "path": (str, True),
        "records": (list, True),
    },
    "move_finish": {
        "ring": (dict, True),
        "from": (str, True),
        "path": (str, True),
        "state": (bytes, True),
        "producers": (list, True),
        "refs": (list, True),
        "end": (int, True),
    },
}

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
    """An op handler refuses a request; answered as an `err` frame of `code`, with
    `args` as its `a` when given (what the code's contract says it carries)."""

    code = "internal"

    def __init__(self, msg: str = "", args: Args | None = None) -> None:
        super().__init__(msg)
        self.args_map = args


class BadArguments(OpError):
    """The op's arguments are missing or of the wrong shape (`err bad_request`)."""

    code = "bad_request"


class Misdirected(OpError):
    """The op names a path this shard does not own (`err misdirected`)."""

    code = "misdirected"


class Moving(OpError):
    """The op names a stream that is moving to or from this shard (`err moving`)."""

    code = "moving"


def ring_free(op: str) -> bool:
    """Whether `op` is served whatever the caller's ring: RING_FREE_OPS, and the moves'
    own ops (`move_*`), which run between shards on different rings by nature."""
    return op in RING_FREE_OPS or op.startswith("move_")


def check_args(op: str, args: Args) -> None:
    """`args` checked against `op`'s ARG_SCHEMAS entry (if it has one); BadArguments."""
    schema = ARG_SCHEMAS.get(op)
    if schema is None:
        return
    for name, (kind, required) in schema.items():
        value = args.get(name)
        if value is None:
            if required:
                raise BadArguments(f"{op}: missing argument {name!r}")
        elif type(value) is not kind:
            raise BadArguments(f"{op}: argument {name!r} is not a {kind.__name__}")


def encode(message: Mapping[str, object] | Outgoing) -> bytes:
    """One frame: length prefix + msgpack body (see `encode_parts`)."""
    parts = encode_parts(message)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def encode_parts(message: Mapping[str, object] | Outgoing) -> list[bytes]:
    """One frame as the pieces a writer sends one after the other: `[frame]`, or for a
    large body `[length prefix + packed head, body]`. A list (common/rpc_core.py's
    constructors) is packed as it is. A dict of a positional kind becomes its array
    (fields it lacks: their defaults where they have one, else nil, which the peer
    refuses); any other dict becomes a map, `v` added when missing.

    A large `b` (body bytes, the array's last item) is not packed by msgpack, which would
    copy it into a growing buffer and out again, nor joined behind its head, which would
    copy it once more on the event loop: the array is packed without it, ending in the
    bin header, and the body itself is the frame's second piece. On the wire that is the
    same msgpack."""
    if isinstance(message, list):
        items = message
    else:
        to_items = _TO_POSITIONAL.get(message.get("k"))
        if to_items is None:
            if "v" not in message:  # the handshake's frames carry it already
                message = {**message, "v": WIRE_VERSION}
            return [_framed(_packers.packer.pack(message))]
        items = to_items(message)
    body = items[-1]
    if type(body) is bytes and len(body) >= RAW_BODY_BYTES:
        packer = msgpack.Packer(use_bin_type=True)
        head = [b"", packer.pack_array_header(len(items))]
        head += [packer.pack(item) for item in items[:-1]]
        head.append(_bin_header(len(body)))
        size = sum(map(len, head)) + len(body)
        _check_size(size)
        head[0] = _HEADER.pack(size)
        return [b"".join(head), body]
    return [_framed(_packers.packer.pack(items))]


def encode_response(
    call_id: int,
    status: int,
    headers: Sequence[Sequence[str]],
    body: bytes,
    token: bytes = b"",
    hit: bool = False,
) -> list[bytes]:
    """`encode_parts(rpc_core.response(call_id, status, headers, body, False, token, hit))`:
    a complete http answer (no chunks follow), packed directly. Every append's and read's
    answer is one; the general encoder's dispatch on the frame's form cost about a fifth
    of the answer's encoding (callgrind: 11.0k -> 8.7k instructions for an append's)."""
    if status == 204 and not body and not token and not hit and len(headers) == 1:
        name, value = headers[0]
        if (
            name == "stream-next-offset"
            and type(value) is str
            and len(value) == _OFFSET_CHARS
            and value.isascii()
        ):
            return [append_answer(call_id, value)]
    items = [RES_HTTP, call_id, status, False, headers, token, hit, body]
    if len(body) >= RAW_BODY_BYTES:
        return encode_parts(items)
    return [_framed(_packers.packer.pack(items))]


def _framed(packed: bytes) -> bytes:
    """`packed` behind its length prefix."""
    size = len(packed)
    if size > MAX_FRAME_BYTES:
        _check_size(size)
    return _pack_length(size) + packed


# Positional kind tags (see the module's docstring).
REQ_HTTP, REQ_OP, RES_HTTP, RES_OP, CHUNK, CANCEL, ERR, REQ_APPEND, RES_DONE = range(9)


# An append's answer (a 204 whose one header is the stream's next offset, 33 ASCII
# characters: shard.core.offsets) is a `done` frame, [RES_DONE, call id, offset]: the
# packed bytes of a template with those two put in (the Packer's 4.2k instructions per
# answer, for its generic dispatch, down to a join).
_OFFSET_CHARS = 33


def _append_template() -> tuple[bytes, bytes]:
    """(before the call id, between it and the offset), cut out of the Packer's own
    bytes for call id 0 and a sample offset."""
    packer = msgpack.Packer(use_bin_type=True)
    offset = "0" * _OFFSET_CHARS
    sample = packer.pack([RES_DONE, 0, offset])
    head = packer.pack_array_header(3) + packer.pack(RES_DONE)
    middle = sample[len(head) + len(packer.pack(0)) : len(sample) - _OFFSET_CHARS]
    if sample != head + packer.pack(0) + middle + offset.encode():  # (a new msgpack)
        raise RuntimeError("msgpack packs an append's answer unlike its template")
    return head, middle


_APPEND_HEAD, _APPEND_MIDDLE = _append_template()
_APPEND_FIXED = len(_APPEND_HEAD) + len(_APPEND_MIDDLE) + _OFFSET_CHARS
_FIXINTS = [bytes((value,)) for value in range(0x80)]
_U8, _U16, _U32, _U64 = (struct.Struct(f">B{c}") for c in "BHIQ")


def _uint(value: int) -> bytes:
    """msgpack's encoding of a non-negative int, as the Packer chooses it (the smallest)."""
    if value < 0x80:
        return _FIXINTS[value]
    if value <= 0xFF:
        return _U8.pack(0xCC, value)
    if value <= 0xFFFF:
        return _U16.pack(0xCD, value)
    if value <= 0xFFFFFFFF:
        return _U32.pack(0xCE, value)
    return _U64.pack(0xCF, value)


# The whole answer in one struct pack for a call id of two or four bytes (every answer's
# from the 256th on a connection): 2.2k instructions where the join cost 4.3k.
_DONE16, _DONE32 = (
    struct.Struct(f">I{len(_APPEND_HEAD)}sB{width}{len(_APPEND_MIDDLE)}s{_OFFSET_CHARS}s").pack
    for width in "HI"
)


# Their decoding (`FrameDecoder._feed`): the length behind the prefix of a
# `done` frame with such a call id, and its items (the head and the middle as integers,
# the id's tag, the id, the offset's bytes) in one unpack: 355 ns per answer where
# msgpack and `parse` took 490.
_DONE16_LENGTH, _DONE32_LENGTH = _APPEND_FIXED + 3, _APPEND_FIXED + 5
_DONE_LENGTHS = (_DONE16_LENGTH, _DONE32_LENGTH)
_DONE16_ITEMS, _DONE32_ITEMS = (
    struct.Struct(f">HB{width}H{_OFFSET_CHARS}s").unpack_from for width in "HI"
)
_DONE_HEAD = int.from_bytes(_APPEND_HEAD, "big")
_DONE_MIDDLE = int.from_bytes(_APPEND_MIDDLE, "big")
if len(_APPEND_HEAD) != 2 or len(_APPEND_MIDDLE) != 2:  # (a new msgpack)
    raise RuntimeError("msgpack packs an append's answer unlike its template")


def append_answer(call_id: int, offset: str) -> bytes:
    """The framed answer `[RES_DONE, call_id, offset]` of an append (`offset`: 33 ASCII
    characters), as `encode_response` gives it: for a caller that knows the answer is
    that one."""
    data = offset.encode()
    if len(data) == _OFFSET_CHARS:
        if 0x100 <= call_id <= 0xFFFF:
            return _DONE16(_APPEND_FIXED + 3, _APPEND_HEAD, 0xCD, call_id, _APPEND_MIDDLE, data)
        if 0x10000 <= call_id <= 0xFFFFFFFF:
            return _DONE32(_APPEND_FIXED + 5, _APPEND_HEAD, 0xCE, call_id, _APPEND_MIDDLE, data)
    packed_id = _uint(call_id)
    return b"".join(
        (
            _pack_length(_APPEND_FIXED + len(packed_id)),
            _APPEND_HEAD,
            packed_id,
            _APPEND_MIDDLE,
            data,
        )
    )


def request_items(
    call_id: object, op: object, ring_version: object, fields: Mapping[str, object]
) -> list[object]:
    """A `req` frame's positional items: an http op's m/p/q/h/t/b, or another op's `a`,
    from `fields` (the one place the layout is written; `rpc_core.request` builds with it)."""
    get = fields.get
    if op == "http":
        if len(fields) == 5 and "t" not in fields:
            try:  # all of m, p, q, h, b (a forwarded request's, `Route.fields`)
                return [
                    REQ_HTTP,
                    call_id,
                    ring_version,
                    fields["m"],
                    fields["p"],
                    fields["q"],
                    fields["h"],
                    b"",
                    fields["b"],
                ]
            except KeyError:  # another five
                pass
        return [
            REQ_HTTP,
            call_id,
            ring_version,
            get("m"),
            get("p"),
            get("q", ""),
            get("h", []),
            get("t", b""),
            get("b", b""),
        ]
    return [REQ_OP, call_id, ring_version, op, get("a", {})]


def pack_http_head(method: str, path: str, query: str, headers: object) -> bytes:
    """The part of an http request's frame that every request of one route has in
    common (`encode_http_request`), packed: for a plain append's route (a POST without
    a query whose one header is its Content-Type) the kind tag REQ_APPEND and the p and
    c items of an `append` frame, else the m, p, q, h and t (empty) items of a `req`,
    one after the other. `headers`: a sequence of name/value pairs of str."""
    packer = msgpack.Packer(use_bin_type=True)
    content_type = _plain_content_type(method, query, headers)
    if content_type is not None and type(path) is str:
        return b"".join((_FIXINTS[REQ_APPEND], packer.pack(path), packer.pack(content_type)))
    return b"".join([packer.pack(item) for item in (method, path, query, headers, b"")])


def _plain_content_type(method: str, query: str, headers: object) -> str | None:
    """The Content-Type of a POST without a query whose one header (of `headers`, a
    sequence of pairs) it is, or None."""
    if method != "POST" or query != "" or not isinstance(headers, list | tuple):
        return None
    if len(headers) != 1 or len(headers[0]) != 2:
        return None
    name, value = headers[0]
    return value if name == "content-type" and type(value) is str else None


def append_items(
    call_id: int, ring_version: int, path: str, content_type: str, body: bytes
) -> list[object]:
    """An `append` frame's positional items (what `encode_http_request` packs for a
    plain append's route)."""
    return [REQ_APPEND, path, content_type, call_id, ring_version, body]


# An http `req` with the head of `pack_http_head` starts with these (an array of nine,
# the kind REQ_HTTP), checked against the Packer's own bytes below.
_REQUEST_START = b"\x99\x00"
_BIN8 = [b"\xc4" + bytes((size,)) for size in range(0x100)]  # bin 8 headers, by size


# The start of a frame of such a request whose call id takes two or four bytes (every
# request's from the 256th on a connection): its length, then the array, REQ_HTTP (the
# pad byte, 0) and the call id behind its uint 16 / uint 32 tag.
_START16 = struct.Struct(">IBxBH").pack
_START32 = struct.Struct(">IBxBI").pack
# Of an `append` frame (a plain append's route):
_APPEND_START = struct.Struct(">IB").pack  # length, then the array of six
_APPEND_IDS16 = struct.Struct(">BHB").pack  # a uint 16 call id, a fixint ring version
_APPEND_IDS32 = struct.Struct(">BIB").pack  # a uint 32 call id, a fixint ring version


def encode_http_request(call_id: int, ring_version: int, head: bytes, body: bytes) -> list[bytes]:
    """`encode_parts(request_items(call_id, "http", ring_version, fields))` for `fields`
    whose m, p, q and h packed are `head` (`pack_http_head`) and whose b is `body`: the
    same bytes without the Packer, as a route's requests differ only in their call id,
    ring version (both non-negative: `common.ring` checks a ring's) and body. A plain
    append's head makes its `append` frame instead: `encode_parts(append_items(...))`."""
    size = len(body)
    if head[0] == REQ_APPEND:  # its `append` frame (here, not in a call of its own)
        if ring_version < 0x80 and 0x100 <= call_id <= 0xFFFFFFFF:  # the most frequent
            if call_id <= 0xFFFF:
                ids = _APPEND_IDS16(0xCD, call_id, ring_version)
            else:
                ids = _APPEND_IDS32(0xCE, call_id, ring_version)
        else:
            ids = _uint(call_id) + _uint(ring_version)
        bin_header = _BIN8[size] if size < 0x100 else _bin_header(size)
        length = 1 + len(head) + len(ids) + len(bin_header) + size
        if length > MAX_FRAME_BYTES:
            _check_size(length)
        start = _APPEND_START(length, 0x96)
        if size >= RAW_BODY_BYTES:
            return [b"".join((start, head, ids, bin_header)), body]
        return [b"".join((start, head, ids, bin_header, body))]
    if size < 0x100 and ring_version < 0x80 and 0x100 <= call_id <= 0xFFFFFFFF:
        # The most frequent: a small body (bin 8), a small ring version (a fixint).
        length = len(head) + size + 8
        if length > MAX_FRAME_BYTES:
            _check_size(length)
        if call_id <= 0xFFFF:
            start = _START16(length, 0x99, 0xCD, call_id)
        else:
            start = _START32(length + 2, 0x99, 0xCE, call_id)
        return [b"".join((start, _FIXINTS[ring_version], head, _BIN8[size], body))]
    ids = _uint(call_id) + _uint(ring_version)
    bin_header = _BIN8[size] if size < 0x100 else _bin_header(size)
    length = 2 + len(ids) + len(head) + len(bin_header) + size
    if length > MAX_FRAME_BYTES:
        _check_size(length)
    if size >= RAW_BODY_BYTES:
        return [b"".join((_pack_length(length), _REQUEST_START, ids, head, bin_header)), body]
    return [b"".join((_pack_length(length), _REQUEST_START, ids, head, bin_header, body))]


def _check_request_start() -> None:
    """The Packer packs an http `req`, and a plain append's `append`, as
    `encode_http_request` writes them (a new msgpack that did not would be caught here,
    at import)."""
    headers = [["content-type", "text/plain"]]
    general = pack_http_head("POST", "a", "q", headers)
    plain = pack_http_head("POST", "a", "", headers)
    cases = ((1, 1, 0), (300, 1, 255), (1 << 20, 0, 7), (300, 70000, 300), (1 << 40, 0, 1 << 14))
    for call_id, version, size in cases:
        body = b"x" * size
        items = [REQ_HTTP, call_id, version, "POST", "a", "q", headers, b"", body]
        if encode_http_request(call_id, version, general, body) != encode_parts(items):
            raise RuntimeError("msgpack packs an http request unlike encode_http_request")
        items = append_items(call_id, version, "a", "text/plain", body)
        if encode_http_request(call_id, version, plain, body) != encode_parts(items):
            raise RuntimeError("msgpack packs an append frame unlike encode_http_request")


def _request_items(m: Mapping[str, object]) -> list[object]:
    return request_items(m.get("i"), m.get("op"), m.get("r"), m)


def _response_items(m: Mapping[str, object]) -> list[object]:
    get = m.get
    if "a" in m:
        return [RES_OP, get("i"), m["a"]]
    return [
        RES_HTTP,
        get("i"),
        get("s", 200),
        get("more", False),
        get("h", []),
        get("t", b""),
        get("hit", False),
        get("b", b""),
    ]


def _chunk_items(m: Mapping[str, object]) -> list[object]:
    get = m.get
    return [CHUNK, get("i"), get("more", False), get("b", b"")]


def _cancel_items(m: Mapping[str, object]) -> list[object]:
    return [CANCEL, m.get("i")]


def _error_items(m: Mapping[str, object]) -> list[object]:
    get = m.get
    return [ERR, get("i"), get("code"), get("msg", ""), get("a")]


_TO_POSITIONAL: dict[object, Callable[[Mapping[str, object]], list[object]]] = {
    "req": _request_items,
    "res": _response_items,
    "chunk": _chunk_items,
    "cancel": _cancel_items,
    "err": _error_items,
}


class _Packers(threading.local):
    """This thread's msgpack Packer (`packer`): `packb` builds one per call, which cost
    about as much as packing a small frame. (A Packer is not thread-safe, hence one per
    thread; made on a thread's first use.)"""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _Packers()


def _bin_header(size: int) -> bytes:
    """msgpack's bin 16 / bin 32 header (the Packer has no call for it)."""
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def _check_size(size: int) -> None:
    if size > MAX_FRAME_BYTES:
        raise WireError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")


_check_request_start()


def coalesce(frames: list[bytes]) -> list[bytes]:
    """What a writer sends for queued `frames` (whole frames, or the pieces of
    `encode_parts`, in order): runs of small pieces joined into one write, large ones
    written as they are (joining would copy them once more)."""
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
    several reads are kept as they came and joined once, when the frame is complete
    (from RAW_BODY_BYTES on, only its body is joined, its head decoded from the pieces).

    `feed_deferred` leaves that join to its caller for a frame of DEFER_BYTES or more
    (an `Unjoined`; `complete` finishes it off the event loop), since joining tens of MB
    is a copy long enough to stall a loop.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._pieces: list[Piece] = []  # an incomplete frame's bytes (views into reads)
        self._have = 0  # their total length
        self._need = 0  # bytes the incomplete frame needs in all (0: not known yet)
        self._max_frame = max_frame
        # When the incomplete frame began, stamped by the reader that enforces a deadline
        # on it; reset here whenever a frame completes (the incomplete one is then new).
        self.frame_started: float | None = None

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, limit: int) -> None:
        """Raised once the peer is authenticated (frames are small until then)."""
        self._max_frame = limit

    @property
    def partial(self) -> int:
        """Bytes of an incomplete frame held (0: between frames)."""
        return self._have

    @property
    def expected(self) -> int:
        """Total bytes (length prefix included) the incomplete frame needs, 0 if unknown."""
        return self._need

    def feed(self, data: Received) -> list[Frame]:
        """The frames `data` completes, every one decoded and checked here."""
        return self._feed(data, False)  # type: ignore[return-value]  # no Unjoined

    def feed_deferred(self, data: Received) -> list[Frame | Unjoined]:
        """As `feed`, but a frame of DEFER_BYTES or more that spans several reads comes
        back as an `Unjoined`, to be finished by `complete`."""
        return self._feed(data, True)

    def _feed(self, data: Piece, defer: bool) -> list[Frame | Unjoined]:
        if self._pieces:
            self._pieces.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            pieces, need, have = self._pieces, self._need, self._have
            self._pieces = []
            self._have = self._need = 0
            if need >= RAW_BODY_BYTES:
                # Likely a body behind its head (encode_parts): decode the head from the
                # pieces and join only the body, its one copy (joining the whole frame
                # and then unpacking the body out of it copied it twice).
                self.frame_started = None
                unjoined = _unjoined(pieces, need)
                first: list[Frame | Unjoined] = [
                    unjoined
                    if defer and need >= DEFER_BYTES
                    else unjoined.finish(b"".join(unjoined.pieces))
                ]
                if have == need:
                    return first
                # The last read also began what follows (bounded: part of one read).
                last = pieces[-1]
                return first + self._feed(memoryview(last)[len(last) - (have - need) :], defer)
            data = b"".join(pieces)
        messages: list[Frame | Unjoined] = []
        size = len(data)
        pos = 0
        max_frame = self._max_frame
        with memoryview(data) as view:
            while size - pos >= 4:
                (length,) = _unpack_length(view, pos)
                if length > max_frame:
                    raise WireError(f"frame length {length} exceeds {max_frame}")
                start = pos + 4
                if size - start < length:
                    self._need = 4 + length
                    break
                pos = start + length
                if length in _DONE_LENGTHS:
                    # Maybe a `done` frame with a two- or four-byte call id (as
                    # `append_answer` packs it): read without msgpack into what
                    # `_parse_done` makes of it. Anything else goes on to msgpack.
                    if length == _DONE16_LENGTH:
                        head, tag, call_id, middle, raw = _DONE16_ITEMS(view, start)
                        tag -= 0xCD
                    else:
                        head, tag, call_id, middle, raw = _DONE32_ITEMS(view, start)
                        tag -= 0xCE
                    if not tag and head == _DONE_HEAD and middle == _DONE_MIDDLE:
                        try:
                            res = _done_response(call_id, raw.decode())
                        except UnicodeDecodeError:
                            res = None
                        if res is not None:
                            messages.append(res)
                            continue
                try:  # (`_decode`, written out: every frame passes here)
                    message = _unpackb(view[start:pos])
                except Exception as exc:  # msgpack raises several unrelated types
                    raise WireError(f"undecodable frame: {exc}") from None
                messages.append(parse(message))
            if messages:
                self.frame_started = None
        if pos < size:
            # a view, not a copy: the start of a large frame is most of a read
            rest = memoryview(data)[pos:] if pos else data
            self._pieces = [rest]
            self._have = len(rest)
            if size - pos < 4:
                self._need = 4  # not even the length yet
        return messages


DEFER_BYTES = bigjoin.THRESHOLD  # frames from this size are joined off the loop (feed_deferred)
HEAD_BYTES = 64 * 1024  # how far into a deferred frame its head (all but `b`) is looked for
HEAD_PROBE_BYTES = 2048  # looked at first: most heads end well before


class Unjoined:
    """A complete frame whose bytes are still the pieces they arrived in.

    `pieces` joined is the body `b` when `head` holds every other item of a positional
    frame (whose last item is a bin), or else the whole msgpack value (`head` is None),
    decoded after the join as any frame."""

    __slots__ = ("head", "pieces", "size")

    def __init__(self, head: Positional | None, pieces: list[Piece], size: int) -> None:
        self.head = head
        self.pieces = pieces
        self.size = size

    def finish(self, joined: bytes) -> Frame:
        """The frame, checked by `parse` like every other, from `pieces` joined."""
        if self.head is None:
            return _decode(memoryview(joined))
        self.head.append(joined)
        return parse(self.head)


async def complete(items: list[Frame | Unjoined]) -> list[Frame]:
    """The frames of a `feed_deferred`, each `Unjoined` joined in a worker thread (see
    common/bigjoin.py) and checked. Between them the event loop keeps running."""
    for index, item in enumerate(items):
        if type(item) is Unjoined:
            items[index] = item.finish(await bigjoin.join(item.pieces, item.size))
    return items  # type: ignore[return-value]  # every Unjoined was replaced


def _slice(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    """The pieces covering bytes [start, stop) of their concatenation. Only the first
    and the last may be cut, as views (no copy); the rest are kept whole."""
    out: list[Piece] = []
    pos = 0
    for piece in pieces:
        end = pos + len(piece)
        if end > start and pos < stop:
            if pos >= start and end <= stop:
                out.append(piece)
            else:
                out.append(memoryview(piece)[max(start - pos, 0) : min(stop, end) - pos])
        pos = end
        if pos >= stop:
            break
    return out


def _unjoined(pieces: list[Piece], need: int) -> Unjoined:
    """The complete frame in `pieces` (its first `need` bytes, length prefix included),
    with its head decoded now when it is in encode_parts' layout."""
    split = None
    for head_bytes in (HEAD_PROBE_BYTES, HEAD_BYTES):  # a head is small: try a little first
        prefix = b"".join(_slice(pieces, 4, min(need, 4 + head_bytes)))
        split = _split_head(prefix, need - 4)
        if split is not None or need <= 4 + head_bytes:
            break
    if split is None:
        return Unjoined(None, _slice(pieces, 4, need), need - 4)
    head, body_start = split
    return Unjoined(head, _slice(pieces, 4 + body_start, need), need - 4 - body_start)


_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # bin 8/16/32: bytes of the length after the type


def _split_head(prefix: bytes, length: int) -> tuple[Positional, int] | None:
    """(every item but the last, where the last one's bytes start) if the frame of
    `length` bytes that `prefix` begins is an array whose last item is a bin running to
    the frame's end; None for any other shape (it is then decoded as a whole, errors and
    all)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=HEAD_BYTES)
    unpacker.feed(prefix)
    try:
        items = unpacker.read_array_header()
        if items < 2:
            return None
        head: Positional = [unpacker.unpack() for _ in range(items - 1)]
        pos = unpacker.tell()
    except Exception:  # out of data, malformed, unhashable: the whole-frame path decides
        return None
    width = _BIN_WIDTH.get(prefix[pos]) if pos < len(prefix) else None
    if width is None or pos + 1 + width > len(prefix):
        return None
    start = pos + 1 + width
    if start + int.from_bytes(prefix[pos + 1 : start], "big") != length:
        return None
    return head, start


def _decode(body: memoryview) -> Frame:
    try:
        message = _unpackb(body)  # raw=False, strict_map_key=True: msgpack's defaults
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"undecodable frame: {exc}") from None
    return parse(message)


_unpackb = msgpack.unpackb


# ---- the frame schema -------------------------------------------------------------------
#
# Typed views of the frames. `parse` checks every field a reader will use (type, and range
# where a bad value would hurt a consumer: ids, statuses, header characters) and fills in
# the defaults, so readers index fields without checking again. The frames are dicts:
# those msgpack made of the handshake's maps, and one made by `parse` per positional
# frame (cheaper than unpacking a map; objects would cost more).

Args = dict[str, object]
Header = list[str]  # [name, value]


class RingInfo(TypedDict):
    version: int
    shards: list[str]
    endpoints: dict[str, str]  # shard id -> "host:port" (those the sender knows)


class HelloFrame(TypedDict):
    k: Literal["hello"]
    v: int
    role: str
    id: str
    nonce: bytes
    r: NotRequired[int]  # the caller's ring version (caller's hello only)
    mac: NotRequired[bytes]  # the shard's proof (shard's hello only)


class AuthFrame(TypedDict):
    k: Literal["auth"]
    v: int
    mac: bytes


class ReadyFrame(TypedDict):
    k: Literal["ready"]
    v: int
    ring: RingInfo
    health: dict[str, str]


class RequestFrame(TypedDict):
    k: Literal["req"]
    i: int
    op: str
    r: int
    a: NotRequired[Args]  # non-http ops only
    m: NotRequired[str]  # op "http" only, and then all of m, p, q, h, t, b are present
    p: NotRequired[str]
    q: NotRequired[str]
    h: NotRequired[list[Header]]
    t: NotRequired[bytes]  # the token of a body the caller holds (b"": none)
    b: NotRequired[bytes]


class AppendFrame(TypedDict):
    """A plain append (`append`): the http request `general_request` gives."""

    k: Literal["append"]
    i: int
    r: int
    p: str
    c: str  # its Content-Type, its one forwarded header
    b: bytes


def general_request(frame: AppendFrame) -> RequestFrame:
    """The http `req` an `append` frame stands for, as `parse` makes it of that
    request's own frame: served by the general path when the plain one declines."""
    return {
        "k": "req",
        "i": frame["i"],
        "op": "http",
        "r": frame["r"],
        "m": "POST",
        "p": frame["p"],
        "q": "",
        "h": [["content-type", frame["c"]]],
        "t": b"",
        "b": frame["b"],
    }


class RequestFields(TypedDict, total=False):
    """What a caller gives for one request: an http op's m, p, q, h, b, or another op's
    `a` (`rpc_core.request` makes the frame of them)."""

    m: str
    p: str
    q: str
    h: list[Header]
    t: bytes
    b: bytes
    a: Args


class ResponseFrame(TypedDict):
    k: Literal["res"]
    i: int
    s: int
    h: list[Header]
    b: bytes
    more: bool
    t: bytes  # the body's token (b"": none)
    hit: bool  # the body is the caller's own (the request's `t`); b is empty
    a: NotRequired[Args]


class ChunkFrame(TypedDict):
    k: Literal["chunk"]
    i: int
    b: bytes
    more: bool


class CancelFrame(TypedDict):
    k: Literal["cancel"]
    i: int


class ErrorFrame(TypedDict):
    k: Literal["err"]
    i: int
    code: str
    msg: str
    a: NotRequired[Args]


Frame = (
    HelloFrame
    | AuthFrame
    | ReadyFrame
    | RequestFrame
    | AppendFrame
    | ResponseFrame
    | ChunkFrame
    | CancelFrame
    | ErrorFrame
)

MAX_CALL_ID = 2**63 - 1


def parse(message: object) -> Frame:
    """`message` (as msgpack decoded it) checked against the schema of its kind.

    Raises WireError for anything else: a frame a reader could trip on never gets past."""
    if type(message) is list:
        kind = message[0] if message else None
        if type(kind) is not int or not 0 <= kind < len(_POSITIONAL):
            raise WireError(f"unknown frame kind {str(kind)[:40]!r}")
        return _POSITIONAL[kind](message)
    if type(message) is not dict:
        raise WireError("frame is neither an array nor a map")
    if message.get("v") != WIRE_VERSION:
        raise WireError(
            f"the peer speaks wire version {str(message.get('v'))[:20]}, this process "
            f"speaks {WIRE_VERSION} (run the same ds-cluster release on every node)"
        )
    kind = message.get("k")
    check = _CHECKS.get(kind) if type(kind) is str else None
    if check is None:
        raise WireError(f"unknown frame kind {str(message.get('k'))[:40]!r}")
    check(message)
    return message  # type: ignore[return-value]  # checked: a Frame (no `cast` call per frame)


def _bad(message: Decoded, field: str) -> WireError:
    return WireError(f"{message['k']} frame: bad or missing {field!r}")


def _bad_item(kind: str, field: str) -> WireError:
    return WireError(f"{kind} frame: bad {field!r}")


def _bad_length(kind: str, message: Positional, items: int) -> WireError:
    return WireError(f"{kind} frame of {len(message)} items, not {items}")


def _check_hello(message: Decoded) -> None:
    for field in ("role", "id"):
        value = message.get(field)
        if type(value) is not str or not 0 < len(value) <= 200:
            raise _bad(message, field)
    nonce = message.get("nonce")
    if type(nonce) is not bytes or not 16 <= len(nonce) <= 64:
        raise _bad(message, "nonce")
    if "r" in message and type(message["r"]) is not int:
        raise _bad(message, "r")
    if "mac" in message and type(message["mac"]) is not bytes:
        raise _bad(message, "mac")


def _check_auth(message: Decoded) -> None:
    if type(message.get("mac")) is not bytes:
        raise _bad(message, "mac")


def _check_ready(message: Decoded) -> None:
    ring = message.get("ring")
    if (
        type(ring) is not dict
        or type(ring.get("version")) is not int
        or type(shards := ring.get("shards")) is not list
        or not all(type(sid) is str for sid in shards)
        or type(endpoints := ring.setdefault("endpoints", {})) is not dict
        or not all(type(k) is str and type(v) is str for k, v in endpoints.items())
    ):
        raise _bad(message, "ring")
    health = message.setdefault("health", {})
    if type(health) is not dict or not all(
        type(key) is str and type(value) is str for key, value in health.items()
    ):
        raise _bad(message, "health")


_CHECKS = {"hello": _check_hello, "auth": _check_auth, "ready": _check_ready}


def _header_pairs(headers: object, response: bool) -> TypeGuard[list[Header]]:
    """Whether `headers` is a list of [name, value] string pairs. A response's values
    become HTTP response headers, so no CR, LF or NUL may pass in them."""
    if type(headers) is not list:
        return False
    for pair in headers:
        if type(pair) is not list or len(pair) != 2:
            return False
        name, value = pair
        if type(name) is not str or type(value) is not str:
            return False
        if response and ("\n" in value or "\r" in value or "\0" in value):
            return False
    return True


# The positional kinds: each checks every item of its array (their number included) and
# returns the frame as the dict its readers index. Written out, since every request and
# every answer passes here.


def _parse_http_request(message: Positional) -> Frame:
    try:
        _, i, r, method, path, query, headers, token, body = message
    except ValueError:
        raise _bad_length("req", message, 9) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("req", "i")
    if type(r) is not int:
        raise _bad_item("req", "r")
    if type(method) is not str:
        raise _bad_item("req", "m")
    if type(path) is not str:
        raise _bad_item("req", "p")
    if type(query) is not str:
        raise _bad_item("req", "q")
    if type(token) is not bytes or len(token) > MAX_TOKEN_BYTES:
        raise _bad_item("req", "t")
    if type(body) is not bytes:
        raise _bad_item("req", "b")
    if not _header_pairs(headers, False):
        raise _bad_item("req", "h")
    return {
        "k": "req",
        "i": i,
        "op": "http",
        "r": r,
        "m": method,
        "p": path,
        "q": query,
        "h": headers,
        "t": token,
        "b": body,
    }


def _parse_op_request(message: Positional) -> Frame:
    try:
        _, i, r, op, args = message
    except ValueError:
        raise _bad_length("req", message, 5) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("req", "i")
    if type(r) is not int:
        raise _bad_item("req", "r")
    if type(op) is not str or op == "http":  # an http request has a layout of its own
        raise _bad_item("req", "op")
    if type(args) is not dict:
        raise _bad_item("req", "a")
    return {"k": "req", "i": i, "op": op, "r": r, "a": args}


def _parse_http_response(message: Positional) -> Frame:
    try:
        _, i, status, more, headers, token, hit, body = message
    except ValueError:
        raise _bad_length("res", message, 8) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("res", "i")
    if type(status) is not int or not 100 <= status <= 599:
        raise _bad_item("res", "s")
    if type(more) is not bool:
        raise _bad_item("res", "more")
    if type(token) is not bytes or len(token) > MAX_TOKEN_BYTES:
        raise _bad_item("res", "t")
    if type(body) is not bytes:
        raise _bad_item("res", "b")
    if type(hit) is not bool or (hit and (body or not token or more)):
        raise _bad_item("res", "hit")  # a hit names a token and carries no body
    if type(headers) is not list:
        raise _bad_item("res", "h")
    for pair in headers:  # (`_header_pairs(headers, True)`, written out: every answer)
        if type(pair) is not list or len(pair) != 2:
            raise _bad_item("res", "h")
        name, value = pair
        if type(name) is not str or type(value) is not str:
            raise _bad_item("res", "h")
        if "\n" in value or "\r" in value or "\0" in value:
            raise _bad_item("res", "h")
    return {
        "k": "res",
        "i": i,
        "s": status,
        "h": headers,
        "b": body,
        "more": more,
        "t": token,
        "hit": hit,
    }


def _parse_op_response(message: Positional) -> Frame:
    try:
        _, i, args = message
    except ValueError:
        raise _bad_length("res", message, 3) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("res", "i")
    if type(args) is not dict:
        raise _bad_item("res", "a")
    return {
        "k": "res",
        "i": i,
        "s": 200,
        "h": [],
        "b": b"",
        "more": False,
        "t": b"",
        "hit": False,
        "a": args,
    }


def _parse_chunk(message: Positional) -> Frame:
    try:
        _, i, more, body = message
    except ValueError:
        raise _bad_length("chunk", message, 4) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("chunk", "i")
    if type(more) is not bool:
        raise _bad_item("chunk", "more")
    if type(body) is not bytes:
        raise _bad_item("chunk", "b")
    return {"k": "chunk", "i": i, "b": body, "more": more}


def _parse_cancel(message: Positional) -> Frame:
    try:
        _, i = message
    except ValueError:
        raise _bad_length("cancel", message, 2) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("cancel", "i")
    return {"k": "cancel", "i": i}


def _parse_error(message: Positional) -> Frame:
    try:
        _, i, code, msg, args = message
    except ValueError:
        raise _bad_length("err", message, 5) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("err", "i")
    if type(code) is not str:
        raise _bad_item("err", "code")
    if type(msg) is not str:
        raise _bad_item("err", "msg")
    if args is None:
        return {"k": "err", "i": i, "code": code, "msg": msg}
    if type(args) is not dict:
        raise _bad_item("err", "a")
    return {"k": "err", "i": i, "code": code, "msg": msg, "a": args}


def _parse_append(message: Positional) -> Frame:
    try:
        _, path, content_type, i, r, body = message
    except ValueError:
        raise _bad_length("append", message, 6) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("append", "i")
    if type(r) is not int:
        raise _bad_item("append", "r")
    if type(path) is not str:
        raise _bad_item("append", "p")
    if type(content_type) is not str:
        raise _bad_item("append", "c")
    if type(body) is not bytes:
        raise _bad_item("append", "b")
    return {"k": "append", "i": i, "r": r, "p": path, "c": content_type, "b": body}


def _parse_done(message: Positional) -> Frame:
    try:
        _, i, offset = message
    except ValueError:
        raise _bad_length("done", message, 3) from None
    if type(i) is not int or not 0 <= i <= MAX_CALL_ID:
        raise _bad_item("done", "i")
    res = _done_response(i, offset) if type(offset) is str else None
    if res is None:
        raise _bad_item("done", "o")  # (a response header's value: `_parse_http_response`)
    return res


def _done_response(call_id: int, offset: str) -> ResponseFrame | None:
    """The response a `done` frame stands for, None if `offset` cannot be a header
    value. A copy of the constant fields (a dict copy clones their hash table) with the
    two that vary set: a third cheaper than the eight-key display, once per append."""
    if "\n" in offset or "\r" in offset or "\0" in offset:
        return None
    res = _DONE.copy()
    res["i"] = call_id
    res["h"] = [["stream-next-offset", offset]]
    return res


# What every `done` frame stands for but its call id and offset (`_parse_done`), in the
# order of the response's fields.
_DONE: ResponseFrame = {
    "k": "res",
    "i": 0,
    "s": 204,
    "h": [],
    "b": b"",
    "more": False,
    "t": b"",
    "hit": False,
}


# Indexed by the kind tags REQ_HTTP ... RES_DONE.
_POSITIONAL: tuple[Callable[[Positional], Frame], ...] = (
    _parse_http_request,
    _parse_op_request,
    _parse_http_response,
    _parse_op_response,
    _parse_chunk,
    _parse_cancel,
    _parse_error,
    _parse_append,
    _parse_done,
)
