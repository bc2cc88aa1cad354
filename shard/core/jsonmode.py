"""JSON mode (PROTOCOL.md 9.1): strict validation, one-level flattening, bounded records.

Record representation: a record's `data` is some of an append's messages, as their own
JSON texts (exactly as the client sent them, minus the outer array brackets) joined by
commas, and it covers one position per message. A read is then just
`b"[" + b",".join(record datas) + b"]"` with no re-encoding, and message counts (fork
sub-offsets) are plain position arithmetic.

An append is cut into records of at most `MAX_RECORD_BYTES` of data (a larger message
is a record of its own), and a record whose messages hold strings or nested values holds
at most `MAX_RECORD_MESSAGES` of them. Splitting a record in the middle (a
fork sub-offset, a read at an unaligned position) is therefore bounded work: comma
arithmetic in C for flat scalars, a per-message scan of at most `MAX_RECORD_MESSAGES`
otherwise. Records stored before this bound existed may be larger; they split the same
way, only slower.

Planning a body (validate it and choose the record cuts) costs time proportional to its
size, so the runtime plans bodies over `INLINE_PLAN_BYTES` off its event loop with
`plan_body` (a pure function of the bytes) and passes the resulting pieces in
`Request.body_pieces` (see `bodies`).

Strict JSON: besides what `json` rejects, NaN/Infinity, numbers that overflow to an
infinite float (`1e999`) and strings with unpaired UTF-16 surrogates (`"\\ud800"`) are
rejected, since other JSON parsers (and JavaScript clients re-encoding them) cannot
represent them faithfully.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from typing import cast

from .errors import bad_request

MAX_RECORD_BYTES = 64 * 1024  # record data per record (one bigger message stays whole)
MAX_RECORD_MESSAGES = 1024  # messages per record when it holds strings or nested values
INLINE_PLAN_BYTES = 64 * 1024  # bodies above this are planned off the runtime's loop

# A plan: the body's record pieces as (start, end, message count) byte ranges into the
# body, in order; or the reason the body is rejected (a 400).
Plan = tuple[tuple[int, int, int], ...] | str

_WS = b" \t\n\r"
_WS_CHARS = " \t\n\r"
_WS_RE = re.compile(r"[ \t\n\r]*")
# `*` matches at every position, so this match is never None.
_match_ws = cast("Callable[[str, int], re.Match[str]]", _WS_RE.match)
_STRUCTURED = ('"', "[", "{")
# A float literal that might overflow to infinity needs a 3-digit exponent, or 200+
# digits before its "." or exponent (below that, 10**(199+99) is still finite).
_LONG_BEFORE_DOT = re.compile(r"\.(?<=[0-9]{200}\.)")
_BIG_EXPONENT = re.compile(r"[eE](?:[+-]?[0-9]{3}|(?<=[0-9]{200}[eE]))")
# An escape in the UTF-16 surrogate range (\uD800-\uDFFF), paired or not.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]|\\u[dD][c-fC-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
# The same overflow rule on a whole body with its digits mapped to "0", "E" to "e" and
# "+" deleted, as two substring tests: a body without either needs no check.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789E", b"000000000e")
_LONG_DIGITS = b"0" * 200


class _Suspects:
    """What a body may hold that the C decoder accepts but strict JSON does not, from
    one cheap look at the whole body; pieces are checked only for what it may hold."""

    __slots__ = ("overflow", "surrogates")

    def __init__(self, body: bytes) -> None:
        self.overflow = False
        if b"." in body or b"e" in body or b"E" in body:  # else there is no float at all
            zeros = body.translate(_DIGITS_TO_ZERO, b"+")
            self.overflow = b"e000" in zeros or (len(body) >= 200 and _LONG_DIGITS in zeros)
        self.surrogates = b"\\u" in body and _SURROGATE_ESCAPE_BYTES.search(body) is not None


class _Invalid(ValueError):
    """The body is not acceptable JSON; the message is the client's 400 text."""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Invalid(f"invalid JSON: number {text[:40]} is too large for a double")
    return value


# NaN/Infinity are Python extensions, not JSON: reject them.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# The decoder's one-value scanner: JSONDecoder.__init__ sets it; typeshed does not declare it.
_SCAN_ONCE: Callable[[str, int], tuple[object, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
# The same, also rejecting overflowing floats; used only where _maybe_huge says so,
# since a Python-level float hook is slower than the C default.
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


# ---------------------------------------------------------------------------------------
# Planning a body


def plan_body(body: bytes) -> Plan:
    """Validate an append/create body and cut it into record pieces (see `Plan`).

    An array's elements are the messages (an empty array has none); any other value is
    one message. Pure and deterministic: the runtime may run it in another process."""
    try:
        return tuple(_plan(body))
    except _Invalid as exc:
        return str(exc)


def _plan(body: bytes) -> Iterator[tuple[int, int, int]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("invalid JSON: body is not UTF-8") from None
    ascii_only = len(text) == len(body)
    suspects = _Suspects(body)
    start = _match_ws(text, 0).end()
    end = len(text.rstrip(_WS_CHARS))
    if start >= end:
        raise _Invalid("invalid JSON: empty body")
    if text[start] != "[":
        _decode_values(text, start, end, suspects, single=True)
        yield _to_bytes(text, body, ascii_only, start, end, 1)
        return
    if text[end - 1] != "]":
        raise _Invalid("invalid JSON")
    pos = _match_ws(text, start + 1).end()
    inner_end = start + 1 + len(text[start + 1 : end - 1].rstrip(_WS_CHARS))
    if pos >= inner_end:
        return  # []: no messages
    if inner_end - pos < 2 * MAX_RECORD_MESSAGES - 1:
        # Too short to need a cut or to hold too many messages: one decode of the array.
        (values,) = _decode_values(text, start, end, suspects, single=True)
        if not isinstance(values, list) or not values:  # a "[" value is a list
            raise _Invalid("invalid JSON")
        yield _to_bytes(text, body, ascii_only, pos, inner_end, len(values))
        return
    byte_pos = pos  # byte offset of text[pos] (equal to pos for ASCII bodies)
    while True:
        cut, count = _next_piece(text, pos, inner_end, suspects)
        piece_end = pos + len(text[pos:cut].rstrip(_WS_CHARS))
        if ascii_only:
            yield pos, piece_end, count
        else:
            begin = byte_pos
            byte_pos += len(text[pos:piece_end].encode("utf-8"))
            yield begin, byte_pos, count
            byte_pos += len(text[piece_end:cut].encode("utf-8"))
        if cut >= inner_end:
            return
        nxt = _match_ws(text, cut + 1).end()  # skip the comma and whitespace
        if not ascii_only:
            byte_pos += len(text[cut:nxt].encode("utf-8"))
        pos = nxt
        if pos >= inner_end:
            raise _Invalid("invalid JSON: trailing comma")


def _to_bytes(
    text: str, body: bytes, ascii_only: bool, start: int, end: int, count: int
) -> tuple[int, int, int]:
    if ascii_only:
        return start, end, count
    begin = len(text[:start].encode("utf-8"))
    return begin, begin + len(text[start:end].encode("utf-8")), count


def _next_piece(text: str, pos: int, end: int, suspects: _Suspects) -> tuple[int, int]:
    """The next record piece of an array's elements starting at `pos`: `(cut, count)`,
    `cut` being the index of the top-level comma that ends it (or `end`)."""
    limit = pos + MAX_RECORD_BYTES
    if limit >= end:
        cut = end
    else:
        cut = text.rfind(",", pos, limit)
        if cut <= pos:
            return _scan_piece(text, pos, end, suspects)  # a message larger than a record
    if (
        cut - pos >= 2 * MAX_RECORD_MESSAGES - 1  # shorter cannot hold so many commas
        and any(text.find(c, pos, cut) >= 0 for c in _STRUCTURED)
        and text.count(",", pos, cut) >= MAX_RECORD_MESSAGES
    ):
        match = _NTH_COMMA.match(text, pos, cut)
        cut = match.end() - 1 if match else cut
    try:
        values = _decode_values(text, pos, cut, suspects, single=False)
    except _Invalid:
        if cut == end:
            raise  # the whole rest is invalid; no other cut can make it valid
        # The cut fell inside a string or a nested value (or the window is invalid).
        # A decode succeeds only at a top-level comma, so try the commas that most
        # often end a message, then fall back to finding them message by message.
        for alternative in _likely_cuts(text, pos, cut):
            try:
                values = _decode_values(text, pos, alternative, suspects, single=False)
            except _Invalid:
                continue
            cut = alternative
            break
        else:
            return _scan_piece(text, pos, end, suspects)
    count = len(values)
    if count == 0:
        raise _Invalid("invalid JSON: empty array element")
    return cut, count


def _likely_cuts(text: str, pos: int, cut: int) -> list[int]:
    """Commas before `cut` right after a closing bracket, brace or quote (the last of
    each), nearest first: where a message that is an object, array or string ends."""
    found = {text.rfind(pattern, pos, cut + 1) + 1 for pattern in _MESSAGE_ENDS}
    return sorted((c for c in found if pos < c < cut), reverse=True)


_MESSAGE_ENDS = ("},", "],", '",')
# Matches up to and including the MAX_RECORD_MESSAGES-th comma.
_NTH_COMMA = re.compile("(?:[^,]*,){%d}" % MAX_RECORD_MESSAGES)  # noqa: UP031


def _scan_piece(text: str, pos: int, end: int, suspects: _Suspects) -> tuple[int, int]:
    """Message by message from `pos`: up to MAX_RECORD_MESSAGES messages and about
    MAX_RECORD_BYTES of text. A message that would take the piece past MAX_RECORD_BYTES
    starts the next piece, so a large message is a record of its own (a read never has
    to split a record inside or right after one)."""
    scan = _SCAN_ONCE
    match_ws = _match_ws
    idx = pos
    count = 0
    last_comma = pos
    while True:
        try:
            _, stop = scan(text, idx)
        except (StopIteration, ValueError, RecursionError):
            raise _Invalid("invalid JSON") from None
        if stop > end:
            raise _Invalid("invalid JSON")
        if count and stop - pos > MAX_RECORD_BYTES:
            return last_comma, count
        if suspects.overflow or suspects.surrogates:
            _check_strict(text, idx, stop, suspects)
        count += 1
        idx = match_ws(text, stop).end()
        if idx >= end:
            return end, count
        if text[idx] != ",":
            raise _Invalid("invalid JSON: expected ',' between array elements")
        if count >= MAX_RECORD_MESSAGES or idx - pos >= MAX_RECORD_BYTES:
            return idx, count
        last_comma = idx
        idx = match_ws(text, idx + 1).end()
        if idx >= end:
            raise _Invalid("invalid JSON: trailing comma")


def _decode_values(
    text: str, start: int, stop: int, suspects: _Suspects, *, single: bool
) -> list[object]:
    """Decode text[start:stop] (one value, or comma-separated values) strictly."""
    piece = text[start:stop]
    source = piece if single else "[" + piece + "]"
    decoder = _STRICT_DECODER if suspects.overflow and _maybe_huge(piece) else _DECODER
    try:
        value = decoder.decode(source)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, _Invalid):
            raise
        raise _Invalid("invalid JSON") from None
    values = [value] if single else value
    if suspects.surrogates and "\\u" in piece and _SURROGATE_ESCAPE.search(piece):
        _check_surrogates(values)
    return values


def _check_strict(text: str, start: int, stop: int, suspects: _Suspects) -> None:
    """`scan_once` accepted text[start:stop] leniently; apply the strict rules to it."""
    piece = text[start:stop]
    if (suspects.overflow and _maybe_huge(piece)) or (
        suspects.surrogates and "\\u" in piece and _SURROGATE_ESCAPE.search(piece)
    ):
        _decode_values(text, start, stop, suspects, single=True)


def _maybe_huge(piece: str) -> bool:
    """Whether `piece` may hold a float literal that overflows (cheap `in` tests first:
    the regexes cost about as much as decoding)."""
    if "." in piece and _LONG_BEFORE_DOT.search(piece):
        return True
    return ("e" in piece or "E" in piece) and _BIG_EXPONENT.search(piece) is not None


def _check_surrogates(values: list[object]) -> None:
    try:
        json.dumps(values, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("invalid JSON: a string holds an unpaired UTF-16 surrogate") from None
    except (ValueError, RecursionError):
        raise _Invalid("invalid JSON") from None


# ---------------------------------------------------------------------------------------
# From a body (and its plan) to messages


def pieces(body: bytes, plan: Plan | None = None) -> list[tuple[bytes, int]]:
    """A body's record datas and message counts, from `plan` (else planned here).

    Raises a 400 for an invalid body. An empty array gives no pieces; callers decide
    whether that is allowed."""
    if plan is None:
        plan = plan_body(body)
    if isinstance(plan, str):
        raise bad_request(plan)
    return [(body[start:stop], count) for start, stop, count in plan]


def parse_body(body: bytes, *, allow_empty: bool) -> tuple[bytes, int]:
    """Validate a body and flatten one level of array, as one record data: `(data, count)`.

    `[]` yields `(b"", 0)` when `allow_empty` (PUT), else 400 (POST, 9.1.3)."""
    parts = pieces(body)
    count = sum(n for _, n in parts)
    if count == 0 and not allow_empty:
        raise bad_request("empty JSON array: nothing to append")
    return b",".join(data for data, _ in parts), count


# ---------------------------------------------------------------------------------------
# Splitting stored records


def split_messages(data: bytes) -> list[bytes]:
    """The individual message texts of a record's data."""
    text = data.decode("utf-8")
    scan = _SCAN_ONCE
    match_ws = _match_ws
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


def _flat(data: bytes) -> bool:
    """No strings and no nesting: every comma separates two messages."""
    return b'"' not in data and b"[" not in data and b"{" not in data


def _comma_index(data: bytes, k: int) -> int:
    """Index of the k-th comma (k >= 1) of flat data, -1 if it has fewer: bisect with
    C-speed counts (about two passes over the data), then step through the last stretch."""
    lo, hi, seen = 0, len(data), 0
    while hi - lo > 512:
        mid = (lo + hi) // 2
        c = data.count(b",", lo, mid)
        if seen + c >= k:
            hi = mid
        else:
            seen += c
            lo = mid
    idx = lo - 1
    for _ in range(k - seen):
        idx = data.find(b",", idx + 1)
        if idx < 0:
            return -1
    return idx


def head(data: bytes, count: int, total: int) -> bytes:
    """The first `count` of a record's `total` messages."""
    if count >= total:
        return data
    if count <= 0:
        return b""
    if _flat(data):
        return data[: _comma_index(data, count)].rstrip(_WS)
    return b",".join(split_messages(data)[:count])


def tail(data: bytes, skip: int) -> bytes:
    """A record's messages after the first `skip`."""
    if skip <= 0:
        return data
    if _flat(data):
        idx = _comma_index(data, skip)
        return data[idx + 1 :].lstrip(_WS) if idx >= 0 else b""
    return b",".join(split_messages(data)[skip:])


def render(parts: list[bytes]) -> bytes:
    """A JSON array response body from record data slices."""
    return b"[" + b",".join(parts) + b"]"
