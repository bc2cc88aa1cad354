"""The sans-IO Durable Streams protocol core.

Everything the protocol says about a stream (offsets, producers, closure, JSON mode,
forks, TTL, caching headers, SSE framing) lives here as pure functions of a request, the
stream's state and the time. The shard runtime wraps it with SQLite, the hub and the
alarm loop; unit tests drive it with plain values. See `model` for the values.

Public API (all pure; `now` is unix seconds; `config` a CoreConfig):

  handle(request, state, now, config, *, resume=None, timed_out=False) -> Decision
      Any request on a stream. `state` is the runtime's current state for the path (None
      if there is none). For reads the runtime passes the *committed* state.
      `resume` is the Wait a long-poll waited on (so `offset=now` keeps its position);
      `timed_out` says whether the wait ended by timeout.

  finish_read(request, state, records, now, config, *, resume=None) -> Reply
      Second half of a read after NeedRecords.

  create_fork(request, export, now, config) -> Reply
      Second half of a fork PUT after NeedSource, given the source's ForkExport.
      `export` may also be a Response (the source's error), which it passes on.

  plan_export(state, offset, sub_offset, now, config) -> Response | int
      On the source's shard: validate a fork request against the source. An int is the
      position below which records must be fetched (records with start < it), then:
  export_fork(state, offset, sub_offset, records, now, config) -> Response | tuple[ForkExport, StreamState]
      Build the export and the source's new state (refcount + 1); persist, then answer.
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
"""
