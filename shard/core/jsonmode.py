"""JSON mode (PROTOCOL.md 9.1): validation, one-level flattening, and rendering.

Record representation: one record per append. Its `data` is the appended messages' own
JSON texts (exactly as the client sent them, minus the outer array brackets) joined by
commas, and it covers one position per message. A read is then just
`b"[" + b",".join(record datas) + b"]"` with no re-encoding, and message counts (fork
sub-offsets) are plain position arithmetic. Only splitting a record in the middle (a fork
sub-offset, or a read at an unaligned position) needs to re-scan message boundaries.
"""

from __future__ import annotations

import json
import re

from .errors import bad_request

_WS = b" \t\n\r"
_WS_RE = re.compile(r"[ \t\n\r]*")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


# NaN/Infinity are Python extensions, not JSON: reject them.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_body(body: bytes, *, allow_empty: bool) -> tuple[bytes, int]:
    """Validate an append/create body and flatten one level of array.

    Returns `(data, count)`: the record data (see module doc) and the number of messages.
    `[]` yields `(b"", 0)` when `allow_empty` (PUT), else 400 (POST, 9.1.3)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("invalid JSON: body is not UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise bad_request("invalid JSON") from None
    stripped = body.strip(_WS)
    if type(value) is list:
        count = len(value)
        if count == 0:
            if allow_empty:
                return b"", 0
            raise bad_request("empty JSON array: nothing to append")
        return stripped[1:-1].strip(_WS), count
    return stripped, 1


def split_messages(data: bytes) -> list[bytes]:
    """The individual message texts of a record's data."""
    text = data.decode("utf-8")
    scan = _DECODER.scan_once
    match_ws = _WS_RE.match
    out: list[bytes] = []
    n = len(text)
    idx = match_ws(text, 0).end()
    while idx < n:
        _, end = scan(text, idx)
        out.append(text[idx:end].encode("utf-8"))
        idx = match_ws(text, end).end()
        if idx < n and text[idx] == ",":
            idx = match_ws(text, idx + 1).end()
    return out


def head(data: bytes, count: int, total: int) -> bytes:
    """The first `count` of a record's `total` messages."""
    if count >= total:
        return data
    return b",".join(split_messages(data)[:count])


def tail(data: bytes, skip: int) -> bytes:
    """A record's messages after the first `skip`."""
    if skip <= 0:
        return data
    return b",".join(split_messages(data)[skip:])


def render(parts: list[bytes]) -> bytes:
    """A JSON array response body from record data slices."""
    return b"[" + b",".join(parts) + b"]"
