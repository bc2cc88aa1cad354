"""Forks (PROTOCOL.md 4.2) by reference, and the stream lifecycle (TTL expiry, GC).

A fork PUT runs in two places. The fork's shard validates the request (`handle` answers
`NeedSource`); the source's shard checks the source and takes a durable reference on it
(refcount + 1) with `plan_export` + `export_fork`, which look at one record at most (the
one holding a sub-offset's anchor). The fork stores only its origin and its own records
(`create_fork`): reads below the divergence position fetch the source's records through
the reference and clip them there (`clip_below`), so a fork costs the same whatever the
source's size, and the source keeps its data (soft-deleted if need be) until the last
fork lets go (`release_fork`).
"""

from __future__ import annotations

from . import jsonmode
from .errors import ProtocolError, error_response
from .headers import media_type
from .model import (
    CoreConfig,
    ForkExport,
    ForkOrigin,
    Record,
    Reply,
    Request,
    Response,
    StreamState,
    evolve,
)
from .offsets import BEGINNING, NOW, decode, encode
from .protocol import CreateParams, created, initial_records, status


def plan_export(
    state: StreamState | None,
    offset: str | None,
    sub_offset: int,
    now: float,
    config: CoreConfig,
    *,
    content_type: str | None = None,
) -> Response | int:
    """Validate a fork of `state` at (`offset`, `sub_offset`). Returns the error to send
    back, or the anchor position A. With a sub-offset, pass `export_fork` the record
    holding A (the first with end > A); without one it needs no records."""
    try:
        return _anchor(state, offset, sub_offset, now, content_type)[1]
    except ProtocolError as err:
        return err.response()


def export_fork(
    state: StreamState | None,
    offset: str | None,
    sub_offset: int,
    records: list[Record] | tuple[Record, ...],
    now: float,
    config: CoreConfig,
    *,
    content_type: str | None = None,
) -> Response | tuple[ForkExport, StreamState]:
    """Build the export and the source's new state (refcount + 1). Persist the state,
    then hand the export to the fork's shard. `records` need only hold the sub-offset's
    anchor record (see plan_export)."""
    try:
        source, anchor = _anchor(state, offset, sub_offset, now, content_type)
    except ProtocolError as err:
        return err.response()
    position = anchor + sub_offset
    if sub_offset > 0:
        # The sub-offset refines the anchor within the next record only (4.2).
        holder = next((r for r in records if r.start <= anchor < r.end), None)
        if holder is None or position > holder.end:
            return error_response(
                400, "Stream-Fork-Sub-Offset names a position past the next data boundary"
            )
    export = ForkExport(
        content_type=source.content_type,
        ttl=source.ttl,
        expires_at=source.expires_at,
        expires_at_ts=source.expires_at_ts,
        offset=offset if offset is not None and offset != NOW else encode(anchor),
        sub_offset=sub_offset,
        position=position,
    )
    return export, evolve(source, refcount=source.refcount + 1)


def clip_below(
    records: list[Record] | tuple[Record, ...], limit: int, json_mode: bool
) -> list[Record]:
    """`records` (in order) cut at position `limit`: none starting at or past it, and one
    that straddles it shortened to end there (JSON: at a message boundary). How a fork's
    inherited read stops at its divergence position, with no trust in what the source
    sent beyond it."""
    out: list[Record] = []
    for r in records:
        if r.start >= limit:
            break
        if r.end > limit:
            keep = limit - r.start
            data = jsonmode.head(r.data, keep, r.end - r.start) if json_mode else r.data[:keep]
            out.append(Record(r.start, limit, data))
            break
        out.append(r)
    return out


def _anchor(
    state: StreamState | None,
    offset: str | None,
    sub_offset: int,
    now: float,
    content_type: str | None,
) -> tuple[StreamState, int]:
    """The live source and the anchor position A, or the ProtocolError that refuses it."""
    code = status(state, now)
    if sub_offset < 0:  # the fork's shard parsed it; a peer's RPC may still send anything
        raise ProtocolError(400, "invalid Stream-Fork-Sub-Offset")
    if code == 404 or state is None:
        raise ProtocolError(404, "fork source stream not found")
    if code == 410:
        raise ProtocolError(409, "fork source stream was deleted")
    if content_type is not None and media_type(content_type) != media_type(state.content_type):
        raise ProtocolError(409, "Content-Type does not match the fork source's content type")
    tail = state.tail
    if offset is None or offset == NOW:
        anchor = tail
    elif offset == BEGINNING:
        anchor = 0
    else:
        decoded = decode(offset)
        if decoded is None:
            raise ProtocolError(400, "invalid Stream-Fork-Offset")
        if decoded > tail:
            raise ProtocolError(400, "Stream-Fork-Offset is beyond the source stream's tail")
        anchor = decoded
    if sub_offset > 0 and anchor >= tail:
        raise ProtocolError(
            400, "Stream-Fork-Sub-Offset names a position past the next data boundary"
        )
    return state, anchor


def create_fork(
    request: Request,
    export: ForkExport | Response,
    now: float,
    config: CoreConfig,
    *,
    ref: str = "",
) -> Reply:
    """Second half of a fork PUT: the new fork from the source's export (or the source's
    error, passed on). `ref` is the runtime's id of the reference the export took.

    If this returns a Reply with `changed=False` after a successful export, the runtime
    must give the reference back (release_fork on the source)."""
    if isinstance(export, Response):
        return Reply(export)
    try:
        params = CreateParams(request)
        if params.content_type is not None and media_type(params.content_type) != media_type(
            export.content_type
        ):
            raise ProtocolError(409, "Content-Type does not match the fork source's content type")
        content_type = params.content_type or export.content_type
        ttl, expires_at, expires_at_ts = params.ttl, params.expires_at, params.expires_at_ts
        if ttl is None and expires_at_ts is None:
            # Inherit the source's expiry (4.2 table): its TTL window or its deadline.
            if export.ttl is not None:
                ttl = export.ttl
            elif export.expires_at_ts is not None:
                expires_at, expires_at_ts = export.expires_at, export.expires_at_ts
        own = initial_records(content_type, request.body, export.position, request.body_pieces)
        tail = own[-1].end if own else export.position
    except ProtocolError as err:
        return Reply(err.response())
    state = StreamState(
        path=request.path,
        content_type=content_type,
        created_at=now,
        tail=tail,
        closed=params.closed,
        ttl=ttl,
        expires_at=expires_at,
        expires_at_ts=expires_at_ts,
        last_access=now,
        fork=ForkOrigin(
            source=params.source or "",
            offset=export.offset,
            sub_offset=export.sub_offset,
            position=export.position,
            ref=ref,
            linked=True,
        ),
    )
    return created(request, state, own)


def release_fork(state: StreamState | None, now: float) -> StreamState | None:
    """A fork of `state` is gone: refcount - 1. None means purge the stream now (it was
    deleted or has expired, and no fork needs its data any more)."""
    if state is None:
        return None
    refcount = max(0, state.refcount - 1)
    if refcount == 0 and (state.soft_deleted or status(state, now) != 0):
        return None
    return evolve(state, refcount=refcount)


def expire(state: StreamState | None, now: float) -> Reply | None:
    """Alarm: the deletion to persist if `state` is past its deadline (purge, or soft-delete
    while forks reference it), else None."""
    if state is None:
        return None
    if state.soft_deleted:
        return Reply(Response(204), changed=True, state=None) if state.refcount == 0 else None
    deadline = state.deadline()
    if deadline is None or deadline > now:
        return None
    if state.refcount > 0:
        return Reply(Response(204), changed=True, state=evolve(state, soft_deleted=True))
    return Reply(Response(204), changed=True, state=None)
