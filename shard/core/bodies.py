"""Append and create bodies as bounded records.

An append (or a create's body) is stored as several records of bounded size, contiguous
and covering its positions in order, all committed in one transaction: a read or a fork
at any position then slices at most one bounded record. Binary bodies are cut every
`MAX_RECORD_BYTES`; JSON bodies are validated and cut at message boundaries by
`jsonmode.plan_body`.

Cutting is linear in the body's size. A runtime that can do it off its event loop sets
`Request.defer_body`; once the core knows a large body (`is_large`) must be read, it
answers `NeedBody`, and the runtime cuts it (`prepare` is pure; the JSON plan may run in a
worker process) and asks again with the result in `Request.body_pieces`. Requests the
core answers without reading the body (a missing or closed stream, a producer's retry)
never cost a cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import jsonmode
from .errors import bad_request
from .headers import is_json
from .model import BodyPieces, Record

MAX_RECORD_BYTES = jsonmode.MAX_RECORD_BYTES  # binary data per record
OFFLOAD_JSON_BYTES = jsonmode.INLINE_PLAN_BYTES  # larger JSON bodies are planned off-loop
OFFLOAD_BINARY_BYTES = 1024 * 1024  # larger binary bodies are cut off-loop (memcpy only)


def binary_plan(size: int) -> tuple[tuple[int, int, int], ...]:
    """Byte ranges `(start, stop, stop - start)` of a binary body's records."""
    return tuple(
        (start, min(start + MAX_RECORD_BYTES, size), min(MAX_RECORD_BYTES, size - start))
        for start in range(0, size, MAX_RECORD_BYTES)
    )


class BodyDeferred(Exception):  # noqa: N818 - a signal to `handle`, not an error
    """Raised by `records` for a large body the runtime offered to cut (`defer_body`)."""

    def __init__(self, json_body: bool) -> None:
        super().__init__("large body")
        self.json = json_body


def is_large(body: bytes, json_body: bool) -> bool:
    """Whether cutting `body` is worth moving off the event loop."""
    return len(body) > (OFFLOAD_JSON_BYTES if json_body else OFFLOAD_BINARY_BYTES)


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
    defer: bool = False,
) -> tuple[Record, ...]:
    """The records a body adds at `tail`, using the runtime's `prepared` pieces when they
    are of the stream's kind. 400 for an invalid JSON body, and for `[]` unless
    `allow_empty` (an append of nothing, 9.1.3). With `defer`, a large body without
    pieces raises BodyDeferred instead of being cut here."""
    json_mode = is_json(content_type)
    if not json_mode and prepared is None and len(body) <= MAX_RECORD_BYTES:
        return (Record(tail, tail + len(body), body),) if body else ()  # the common case
    pieces: Sequence[tuple[bytes, int]]
    usable = prepared is not None and prepared.json == json_mode
    if defer and not usable and is_large(body, json_mode):
        raise BodyDeferred(json_mode)
    if usable:
        assert prepared is not None
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
