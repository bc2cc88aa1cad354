"""The sans-IO Durable Streams protocol core.

Everything the protocol says about a stream (offsets, producers, closure, JSON mode,
forks, TTL, caching headers, SSE framing) lives here as pure functions of a request, the
stream's state and the time. The shard runtime wraps it with SQLite, the hub and the
alarm loop; unit tests drive it with plain values. See `model` for the values.

Public API (all pure; `now` is unix seconds; `config` a CoreConfig):

  handle(request, state, now, config, *, resume=None) -> Decision
      Any request on a stream. `state` is the runtime's current state for the path (None
      if there is none). For reads the runtime passes the *committed* state.
      `resume` is the Wait a long-poll waited on (so `offset=now` keeps its position);
      whether the wait ended by timeout or by news, the committed state tells.

  finish_read(request, state, records, now, config, *, resume=None) -> Reply
      Second half of a read after NeedRecords.

  create_fork(request, export, now, config, *, ref="") -> Reply
      Second half of a fork PUT after NeedSource, given the source's ForkExport.
      `export` may also be a Response (the source's error), which it passes on.
      `ref` (the runtime's id for the reference the export took) lands in `fork.ref`.

  plan_export(state, offset, sub_offset, now, config, *, content_type=None) -> Response | int
      On the source's shard: validate a fork request against the source. An int is the
      anchor position; with a sub-offset, fetch the one record holding it, then:
  export_fork(state, offset, sub_offset, records, now, config, *, content_type=None)
      -> Response | tuple[ForkExport, StreamState]
      Build the export (settings and divergence position, no data) and the source's new
      state (refcount + 1); persist, then answer. Pass NeedSource.content_type as
      `content_type` to both, so a type mismatch is a 409 from the source before any
      reference is taken.
  clip_below(records, limit, json_mode) -> list[Record]
      Records cut at `limit` (JSON at a message boundary): a linked fork's inherited
      records, fetched from its source, end at the fork's divergence position.
  release_fork(state, now) -> StreamState | None
      A fork of this stream is gone: refcount - 1; None when the stream should be purged
      (soft-deleted and no forks left).
  expire(state, now) -> Reply | None
      Alarm: if the stream's deadline has passed, the deletion to persist (purge, or
      soft-delete when forks still reference it); None if it is not due.

  sse.SseSession  -- see core/sse.py: `head`, `position`, `done`, `ends_at`, `step()`.

Runtime rules the core relies on:
  * A Reply with changed=True and fresh=True replaces any stored incarnation at the path
    (drop its records and producers first). Any incarnation with `fork` set that is
    purged or replaced releases its reference on the source (`fork.source`, `fork.ref`).
  * NeedRecords / Wait / StartSse and any Reply with touch=True on an existing stream
    refresh `last_access` (TTL), which may be persisted lazily.
  * If create_fork returns a Reply with changed=False after export_fork succeeded (the
    fork request turned out invalid, e.g. a bad JSON body), release that reference.
  * A fork whose `fork.linked` is set stores only records from `fork.position` on; its
    records below that are the source's (read through `fork.ref`, recursively for a fork
    of a fork), cut with `clip_below(records, fork.position, ...)`. A source keeps its
    records while its refcount is above 0, soft-deleted or expired included.
  * Writes must see every decision already taken on the stream (serialize per stream);
    reads get the committed state and records no newer than it (the core clips to
    `state.tail`).

Offsets are `"%016d_%016d" % (0, position)`. An append is stored as one or more
bounded records, contiguous, in one transaction (see `bodies`). Binary streams: positions
count bytes. JSON streams: positions count messages, a record's data is its messages'
JSON texts joined by "," (see `jsonmode`).
  * A runtime that sets `Request.defer_body` gets `NeedBody` for a large body the core
    needs: it cuts the body off its event loop (`bodies.prepare`) and calls `handle`
    again with the result in `Request.body_pieces` (see `bodies`).
"""

from .forks import clip_below, create_fork, expire, export_fork, plan_export, release_fork
from .model import (
    CoreConfig,
    Decision,
    ForkExport,
    ForkOrigin,
    NeedBody,
    NeedRecords,
    NeedSource,
    ProducerState,
    Record,
    Reply,
    Request,
    Response,
    StartSse,
    StreamState,
    Wait,
)
from .protocol import (
    finish_read,
    handle,
    plain_append,
    plain_append_at,
    plain_append_parts,
    plain_append_typed,
    plain_content_type,
)
from .sse import SseSession

__all__ = [
    "CoreConfig",
    "Decision",
    "ForkExport",
    "ForkOrigin",
    "NeedBody",
    "NeedRecords",
    "NeedSource",
    "ProducerState",
    "Record",
    "Reply",
    "Request",
    "Response",
    "SseSession",
    "StartSse",
    "StreamState",
    "Wait",
    "clip_below",
    "create_fork",
    "expire",
    "export_fork",
    "finish_read",
    "handle",
    "plain_append",
    "plain_append_at",
    "plain_append_parts",
    "plain_append_typed",
    "plain_content_type",
    "plan_export",
    "release_fork",
]
