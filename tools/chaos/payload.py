"""How chaos writers encode their messages, and how readers decode them back to ids.

Every message carries a unique id (``w3-000017-1``: writer, producer seq, index in the
batch), so the verifier can tell lost, duplicated and reordered writes apart. JSON streams
store one object per message; binary streams store length-prefixed frames whose filler
bytes are derived from the id, so a corrupted or torn frame is detected, not just a
missing one.
"""

from __future__ import annotations

import hashlib
import json
import struct

JSON = "application/json"
BINARY = "application/octet-stream"

_LEN = struct.Struct(">H")


class PayloadError(ValueError):
    """Stream content that no chaos writer could have produced (corruption, torn frame)."""


def message_id(writer: str, seq: int, index: int) -> str:
    return f"{writer}-{seq:06d}-{index}"


def writer_of(mid: str) -> str:
    """The writer name inside a message id."""
    return mid.rsplit("-", 2)[0]


def _filler(mid: str) -> bytes:
    digest = hashlib.sha256(mid.encode()).digest()
    return digest[: 8 + digest[0] % 24]  # 8..31 bytes, any byte values


def encode_batch(content_type: str, ids: list[str]) -> bytes:
    """The POST body that appends `ids` as separate messages, in order."""
    if content_type == JSON:
        return json.dumps([{"id": mid, "pad": mid[::-1]} for mid in ids]).encode()
    out = bytearray()
    for mid in ids:
        body = mid.encode() + b"\x00" + _filler(mid)
        out += _LEN.pack(len(body)) + body
    return bytes(out)


def decode_json(body: bytes) -> list[str]:
    """Ids in a JSON read response (a JSON array of messages)."""
    try:
        messages = json.loads(body) if body.strip() else []
    except ValueError as exc:
        raise PayloadError(f"response is not JSON: {exc}") from None
    if not isinstance(messages, list):
        raise PayloadError("JSON response is not an array")
    ids = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("id"), str):
            raise PayloadError(f"unexpected JSON message {message!r:.80}")
        if message.get("pad") != message["id"][::-1]:
            raise PayloadError(f"corrupted JSON message {message!r:.80}")
        ids.append(message["id"])
    return ids


class FrameBuffer:
    """Accumulates binary stream bytes and yields whole frames' ids.

    A frame may straddle two responses, so leftovers are kept until more bytes come.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        ids: list[str] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 2:
            (length,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 2 < length:
                break
            body = bytes(buf[pos + 2 : pos + 2 + length])
            pos += 2 + length
            mid_bytes, sep, filler = body.partition(b"\x00")
            try:
                mid = mid_bytes.decode("ascii")
            except UnicodeDecodeError:
                raise PayloadError(f"undecodable frame id {mid_bytes[:40]!r}") from None
            if not sep or filler != _filler(mid):
                raise PayloadError(f"corrupted binary frame for {mid!r:.60}")
            ids.append(mid)
        del buf[:pos]
        return ids


class Decoder:
    """Turns successive response bodies of one stream into message ids."""

    def __init__(self, content_type: str) -> None:
        self.content_type = content_type
        self._frames = FrameBuffer() if content_type != JSON else None

    def feed(self, body: bytes) -> list[str]:
        if self._frames is None:
            return decode_json(body)
        return self._frames.feed(body)

    @property
    def leftover(self) -> int:
        """Bytes of an incomplete trailing frame (must be 0 at a write boundary)."""
        return self._frames.pending if self._frames is not None else 0
