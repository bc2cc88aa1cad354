"""Append and create bodies as bounded records.

An append (or a create's body) is stored as several records of bounded size, contiguous
and covering its positions in order, all committed in one transaction: a read or a fork
at any position then slices at most one bounded record. Binary bodies are cut every
`MAX_RECORD_BYTES`; JSON bodies are validated and cut at message boundaries by
`jsonmode.plan_body`.

Cutting is linear in the body's size. For large bodies (`offload`), the runtime cuts them
before calling the core, off its event loop (`prepare` is pure; the JSON plan may run in a
worker process) and passes the result in `Request.body_pieces`.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import jsonmode
from .errors import bad_request
from .headers import is_json
from .model import BodyPieces, Record, Request

MAX_RECORD_BYTES = jsonmode.MAX_RECORD_BYTES  # binary data per record
OFFLOAD_JSON_BYTES = jsonmode.INLINE_PLAN_BYTES  # larger JSON bodies are planned off-loop
OFFLOAD_BINARY_BYTES = 1024 * 1024  # larger binary bodies are cut off-loop (memcpy only)


def binary_plan(size: int) -> tuple[tuple[int, int, int], ...]:
    """Byte ranges `(start, stop, stop - start)` of a binary body's records."""
    return tuple(
        (start, min(start + MAX_RECORD_BYTES, size), min(MAX_RECORD_BYTES, size - start))
        for start in range(0, size, MAX_RECORD_BYTES)
    )


def offload(request: Request) -> bool | None:
    """Whether the runtime should cut this request's body before the core sees it: None
    for no, else whether it is JSON (by the request's Content-Type; a body of the other
    kind than the stream is refused by the core anyway, and a mismatched cut ignored)."""
    body = request.body
    if request.method not in ("POST", "PUT") or len(body) <= OFFLOAD_JSON_BYTES:
        return None
    ct = request.headers.get("content-type")
    json_body = ct is not None and is_json(ct)
    if not json_body and len(body) <= OFFLOAD_BINARY_BYTES:
        return None
    return json_body


def assemble(body: bytes, plan: jsonmode.Plan) -> tuple[tuple[tuple[bytes, int], ...], str | None]:
    """`BodyPieces` fields from a plan (see jsonmode.Plan); slicing copies the body."""
    if isinstance(plan, str):
        return (), plan
    if len(plan) == 1 and plan[0][0] == 0 and plan[0][1] == len(body):
        return ((body, plan[0][2]),), None
    return tuple((body[start:stop], count) for start, stop, count in plan), None


def prepare(body: bytes, json_body: bool) -> BodyPieces:
    """The body's record pieces (what the core would compute inline)."""
    plan = jsonmode.plan_body(body) if json_body else binary_plan(len(body))
    pieces, error = assemble(body, plan)
    return BodyPieces(json_body, pieces, error)


def records(
    content_type: str,
    body: bytes,
    tail: int,
    prepared: BodyPieces | None = None,
    *,
    allow_empty: bool,
) -> tuple[Record, ...]:
    """The records a body adds at `tail`, using the runtime's `prepared` pieces when they
    are of the stream's kind. 400 for an invalid JSON body, and for `[]` unless
    `allow_empty` (an append of nothing, 9.1.3)."""
    json_mode = is_json(content_type)
    pieces: Sequence[tuple[bytes, int]]
    if prepared is not None and prepared.json == json_mode:
        if prepared.error is not None:
            raise bad_request(prepared.error)
        pieces = prepared.pieces
    elif json_mode:
        pieces = jsonmode.pieces(body)
    elif len(body) <= MAX_RECORD_BYTES:
        pieces = ((body, len(body)),) if body else ()
    else:
        pieces = assemble(body, binary_plan(len(body)))[0]
    if not pieces:
        if json_mode and not allow_empty:
            raise bad_request("empty JSON array: nothing to append")
        return ()
    out = []
    position = tail
    for data, count in pieces:
        out.append(Record(position, position + count, data))
        position += count
    return tuple(out)
