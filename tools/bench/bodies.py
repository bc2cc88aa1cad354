"""The append scenarios' bodies: unique, derived from (stream, writer, sequence), so a
read-back names every record and can be compared byte for byte. Both load drivers (the
Python workers of append.py and wrk's append.lua, which writes the same bytes) and both
verifiers use these definitions."""

from __future__ import annotations

import json
from typing import Any

_FILLER = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 4

CONTENT_TYPES = {
    "bytes": "application/octet-stream",
    "json": "application/json",
    "json10": "application/json",
    "sink": "application/octet-stream",
}


def body_bytes(s: int, c: int, q: int) -> bytes:
    """The 100-byte octet-stream body number q of writer c on stream s."""
    head = b"s%05dc%04dq%09d|" % (s, c, q)
    return head + _FILLER[: 99 - len(head)] + b"\n"


def message(s: int, c: int, q: int) -> dict[str, Any]:
    """One JSON message (about 100 bytes serialized)."""
    return {"s": s, "c": c, "q": q, "p": _FILLER[:60].decode()}


def json_body(mode: str, s: int, c: int, q: int) -> bytes:
    """POST body number q: one message, or a batch of ten (messages q*10 .. q*10+9)."""
    if mode == "json":
        return json.dumps(message(s, c, q), separators=(",", ":")).encode()
    return json.dumps(
        [message(s, c, q * 10 + j) for j in range(10)], separators=(",", ":")
    ).encode()


def expected(mode: str, s: int, c: int, q: int) -> Any:
    """What record q of writer c on stream s reads back as (message q for JSON modes)."""
    return body_bytes(s, c, q) if mode == "bytes" else message(s, c, q)


def records(mode: str, chunks: list[bytes]) -> list[Any]:
    """Split read-back content into records: (s, c, q, exact bytes or message), or
    ("torn", length) / ("garbage", bytes) for what is not a whole record of ours."""
    out: list[Any] = []
    if mode == "bytes":
        data = b"".join(chunks)
        if len(data) % 100:
            out.append(("torn", len(data)))
            data = data[: len(data) - len(data) % 100]
        for i in range(0, len(data), 100):
            rec = data[i : i + 100]
            try:
                s, c, q = int(rec[1:6]), int(rec[7:11]), int(rec[12:21])
            except ValueError:
                out.append(("garbage", rec))
                continue
            out.append((s, c, q, rec))
        return out
    for chunk in chunks:
        for m in json.loads(chunk or b"[]"):
            if isinstance(m, dict):
                out.append((m.get("s"), m.get("c"), m.get("q"), m))
            else:
                out.append(("garbage", m))
    return out
