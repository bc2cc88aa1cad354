"""Request handling: one pure function per HTTP method on a stream (PROTOCOL.md 4-5, 8-10).

`handle` dispatches; every branch either answers (`Reply`) or asks the runtime for
something (`NeedRecords`, `Wait`, `NeedSource`, `StartSse`, `NeedBody`). Errors are raised as
`ProtocolError` while parsing and turned into replies here, so a rejected request never
produces a state change.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from ds_cluster.common.paths import PathError, stream_path_from_url

from . import bodies, jsonmode, producers
from .cursor import next_cursor
from .errors import ProtocolError, bad_request, error_response
from .headers import (
    DEFAULT_CONTENT_TYPE,
    is_json,
    is_true,
    media_type,
    parse_expires_at,
    parse_producer,
    parse_read_query,
    parse_sub_offset,
    parse_ttl,
    request_content_type,
    valid_content_type,
)
from .model import (
    BodyPieces,
    CoreConfig,
    Decision,
    NeedBody,
    NeedRecords,
    NeedSource,
    Record,
    Reply,
    Request,
    Response,
    StartSse,
    StreamState,
    Wait,
    advance,
    evolve,
)
from .offsets import BEGINNING, MAX_POSITION, NOW, decode, encode
from .reads import CACHE_PUBLIC, CLOSED, NO_STORE, UP_TO_DATE, collect, etag, if_none_match
from .sse import SseSession

STREAM_PREFIX = "/v1/stream/"
_ALLOW = ("allow", "GET, HEAD, PUT, POST, DELETE")
_NOT_FOUND = "stream not found"
_GONE = "stream is gone: deleted, but its data is kept for forks"


# ---------------------------------------------------------------------------------------
# Liveness


def status(state: StreamState | None, now: float) -> int:
    """0 if `state` is a live stream, else what direct access gets: 404 (absent, or expired
    with no forks) or 410 (soft-deleted, or expired while forks still reference it)."""
    if state is None:
        return 404
    if state.soft_deleted:
        return 410
    ttl = state.ttl
    if (ttl is not None and state.last_access + ttl <= now) or (
        state.expires_at_ts is not None and state.expires_at_ts <= now
    ):
        return 410 if state.refcount > 0 else 404
    return 0


def _absent(code: int, method: str) -> Reply:
    if method == "HEAD":
        return Reply(Response(code))
    return Reply(error_response(code, _NOT_FOUND if code == 404 else _GONE))


# ---------------------------------------------------------------------------------------
# Entry point


def handle(
    request: Request,
    state: StreamState | None,
    now: float,
    config: CoreConfig,
    *,
    resume: Wait | None = None,
) -> Decision:
    """Decide what a request on a stream does (see the package docstring)."""
    method = request.method
    try:
        if method == "GET":
            return _read(request, state, now, config, resume)
        if method == "POST":
            if state is not None:
                reply = plain_append(request, state, now)
                if reply is not None:
                    return reply
            return _append(request, state, now)
        if method == "PUT":
            return _create(request, state, now)
        if method == "HEAD":
            return _head(request, state, now)
        if method == "DELETE":
            return _delete(state, now)
    except ProtocolError as err:
        return Reply(err.response())
    except bodies.BodyDeferred as deferred:
        return NeedBody(deferred.json)
    return Reply(error_response(405, "method not allowed", (_ALLOW,)))


# ---------------------------------------------------------------------------------------
# HEAD / DELETE


def _head(request: Request, state: StreamState | None, now: float) -> Reply:
    code = status(state, now)
    if code or state is None:
        return _absent(code, "HEAD")
    headers = [
        ("content-type", state.content_type),
        ("stream-next-offset", encode(state.tail)),
        NO_STORE,
    ]
    if state.closed:
        headers.append(CLOSED)
    if state.ttl is not None:
        headers.append(("stream-ttl", str(state.ttl)))
    if state.expires_at is not None:
        headers.append(("stream-expires-at", state.expires_at))
    return Reply(Response(200, tuple(headers)))


def _delete(state: StreamState | None, now: float) -> Reply:
    code = status(state, now)
    if code or state is None:
        return _absent(code, "DELETE")
    if state.refcount > 0:
        # Forks still read this data: keep it, hide the stream (4.2 soft-delete).
        return Reply(Response(204), changed=True, state=evolve(state, soft_deleted=True))
    return Reply(Response(204), changed=True, state=None)


# ---------------------------------------------------------------------------------------
# POST: append / close


# Headers whose presence makes an append more than plain data at the tail.
_NOT_PLAIN = frozenset(
    ("producer-id", "producer-epoch", "producer-seq", "stream-closed", "stream-seq")
)
# `_plain_type`'s answers by content type, looked up by `plain_append_parts` itself (an
# lru_cache's wrapper cost 700 instructions per append); emptied when it fills.
_PLAIN_TYPES: dict[str, bool] = {}
_PLAIN_TYPES_MAX = 1024
_new = object.__new__


def _plain_type(content_type: str) -> bool:
    """Whether an append sending the stream's own `content_type` string has nothing to
    check of it: a valid type (as `request_content_type` would find it), not JSON."""
    plain = valid_content_type(content_type) and not is_json(content_type)
    if len(_PLAIN_TYPES) >= _PLAIN_TYPES_MAX:
        _PLAIN_TYPES.clear()
    _PLAIN_TYPES[content_type] = plain
    return plain


def plain_append(request: Request, state: StreamState, now: float) -> Reply | None:
    """The common append (a POST on the existing `state`), decided exactly as `handle`
    would, in fewer steps; None when it is not that case (and `handle` decides): the
    Reply of `plain_append_parts`, for a body not prepared by the runtime."""
    if request.body_pieces is not None:
        return None
    parts = plain_append_parts(request.headers, request.body, state, now)
    if parts is None:
        return None
    new_state, record, offset = parts
    return Reply(Response(204, (("stream-next-offset", offset),)), True, new_state, (record,))


def plain_content_type(headers: Mapping[str, str]) -> str | None:
    """The Content-Type of a POST whose lower-case `headers` leave it a plain append if
    anything (no producer, Stream-Seq or Stream-Closed header; see
    `plain_append_parts`), or None."""
    if not _NOT_PLAIN.isdisjoint(headers):  # (one call for the five names)
        return None
    return headers.get("content-type")


def plain_append_parts(
    headers: Mapping[str, str], body: bytes, state: StreamState, now: float
) -> tuple[StreamState, Record, str] | None:
    """A POST's plain append on the existing `state`, from the request's lower-case
    `headers` and `body`: (the new state, its one record, the Stream-Next-Offset of its
    204, which has no other header and no body), or None when it is not that case.
    Plain: a live stream without expiry, not closed; no producer, Stream-Seq or
    Stream-Closed header; the stream's own Content-Type string; a binary body of one
    record. The new state is `advance(state, ...)`: only the tail and the last access
    move (`closed` stays False, `closed_by` becomes None).

    Every client append repeats this case, and `_append` spends most of its steps on
    the others (three header parsers, the 409 checks, evolve's keyword changes). The
    runtime asks it first (`ShardService.append_now`), without building the Request,
    Reply and Response objects (about 13k instructions of an append's)."""
    content_type = plain_content_type(headers)
    if content_type is None:
        return None
    return plain_append_typed(content_type, body, state, now)


def plain_append_typed(
    content_type: str, body: bytes, state: StreamState, now: float
) -> tuple[StreamState, Record, str] | None:
    """`plain_append_parts` of a POST whose headers are its `content_type` alone (a
    shard link's `append` frame, `common.wire`)."""
    parts = plain_append_at(content_type, body, state, state.tail)
    if parts is None:
        return None
    record, offset = parts
    return advance(state, record.end, now), record, offset


def plain_append_at(
    content_type: str, body: bytes, state: StreamState, tail: int
) -> tuple[Record, str] | None:
    """`plain_append_typed` of `state` advanced to `tail` (`advance(state, tail, t)`,
    of any last access `t`), without that state: its one record and the
    Stream-Next-Offset of its 204; the new state is `advance(state, record.end, now)`.
    The runtime keeps a plain append's tail beside the state it advances instead of a
    copy of the state per append (`shard.streams.Entry`). `state` must not be closed,
    as an advanced state never is (a closed one is refused here, as it must be)."""
    if (
        state.closed
        or state.soft_deleted
        or state.ttl is not None
        or state.expires_at_ts is not None
    ):
        return None
    size = len(body)
    if not size or size > bodies.MAX_RECORD_BYTES:
        return None
    if content_type != state.content_type:
        return None
    plain = _PLAIN_TYPES.get(content_type)
    if not (_plain_type(content_type) if plain is None else plain):
        return None
    new_tail = tail + size
    if new_tail > MAX_POSITION:
        return None
    # The Record's slots filled here, not through the class call (Python 3.11 runs its
    # `__init__` through a slow generic path; callgrind: about 550 instructions).
    record = _new(Record)
    record.start = tail
    record.end = new_tail
    record.data = body
    return record, encode(new_tail)


def _append(request: Request, state: StreamState | None, now: float) -> Reply:
    code = status(state, now)
    if code or state is None:
        return _absent(code, "POST")
    headers = request.headers
    producer = parse_producer(headers)
    close = is_true(headers.get("stream-closed"))
    body = request.body
    if body:
        ct = request_content_type(headers)
        if ct is None:
            raise bad_request("Content-Type is required when appending data")
    elif not close:
        raise bad_request("empty body: nothing to append (send Stream-Closed: true to close)")
    tail = state.tail

    if state.closed:
        # Closed first (5.2 error precedence), so clients always see Stream-Closed.
        tail_header = ("stream-next-offset", encode(tail))
        if producer is not None and state.closed_by == producer:
            return Reply(Response(204, (tail_header, CLOSED, *_producer_headers(producer))))
        if not body and producer is None:
            return Reply(Response(204, (tail_header, CLOSED)), touch=True)
        raise ProtocolError(409, "stream is closed", (CLOSED, tail_header))

    # (the same string, as a client's every append sends it, needs no parsing)
    if body and ct != state.content_type and media_type(ct) != media_type(state.content_type):
        raise ProtocolError(
            409, f"Content-Type does not match the stream's content type ({state.content_type})"
        )

    new_producers = state.producers
    if producer is not None:
        pid, epoch, seq = producer
        accepted, pstate = producers.check(state.producers, pid, epoch, seq)
        if not accepted:
            dup_headers = [
                ("stream-next-offset", encode(tail)),
                ("producer-epoch", str(pstate.epoch)),
                ("producer-seq", str(pstate.last_seq)),
            ]
            return Reply(Response(204, tuple(dup_headers)))
        new_producers = dict(state.producers)
        new_producers[pid] = pstate

    stream_seq = headers.get("stream-seq")
    if stream_seq is not None:
        if not stream_seq:
            raise bad_request("empty Stream-Seq")
        last = state.last_stream_seq
        if last is not None and stream_seq <= last:
            raise ProtocolError(409, "Stream-Seq must increase (lexicographically)")
    else:
        stream_seq = state.last_stream_seq

    records: tuple[Record, ...] = ()
    new_tail = tail
    if body:
        records = bodies.records(
            state.content_type,
            body,
            tail,
            request.body_pieces,
            allow_empty=False,
            defer=request.defer_body,
        )
        new_tail = records[-1].end
        if new_tail > MAX_POSITION:
            raise ProtocolError(413, "stream is full")

    new_state = evolve(
        state,
        tail=new_tail,
        closed=close,
        closed_by=producer if close else None,
        last_access=now,
        last_stream_seq=stream_seq,
        producers=new_producers,
    )
    out = [("stream-next-offset", encode(new_tail))]
    if close:
        out.append(CLOSED)
    if producer is not None:
        out.extend(_producer_headers(producer))
        code = 200 if body else 204
    else:
        code = 204
    return Reply(Response(code, tuple(out)), changed=True, state=new_state, records=records)


def _producer_headers(producer: tuple[str, int, int]) -> tuple[tuple[str, str], ...]:
    return (("producer-epoch", str(producer[1])), ("producer-seq", str(producer[2])))


# ---------------------------------------------------------------------------------------
# PUT: create (or fork)


class CreateParams:
    """The validated configuration a PUT asks for."""

    __slots__ = (
        "content_type",
        "ttl",
        "expires_at",
        "expires_at_ts",
        "closed",
        "source",
        "fork_offset",
        "fork_position",
        "sub_offset",
    )

    def __init__(self, request: Request) -> None:
        h = request.headers
        forked_from = h.get("stream-forked-from")
        fork_offset = h.get("stream-fork-offset")
        sub_raw = h.get("stream-fork-sub-offset")
        if forked_from is None and (fork_offset is not None or sub_raw is not None):
            raise bad_request("Stream-Fork-Offset/Sub-Offset require Stream-Forked-From")
        ttl_raw = h.get("stream-ttl")
        exp_raw = h.get("stream-expires-at")
        if ttl_raw is not None and exp_raw is not None:
            raise bad_request("Stream-TTL and Stream-Expires-At are mutually exclusive")
        self.ttl = parse_ttl(ttl_raw) if ttl_raw is not None else None
        self.expires_at_ts = parse_expires_at(exp_raw) if exp_raw is not None else None
        self.expires_at = exp_raw.strip() if exp_raw is not None else None
        self.content_type = request_content_type(h)
        self.closed = is_true(h.get("stream-closed"))
        self.source = None
        self.fork_offset = None
        self.fork_position = None
        self.sub_offset = 0
        if forked_from is not None:
            self.source = source_path(forked_from)
            if sub_raw is not None:
                self.sub_offset = parse_sub_offset(sub_raw)
            if fork_offset is not None:
                fork_offset = fork_offset.strip()
                if fork_offset != NOW:
                    self.fork_offset = fork_offset
                    self.fork_position = _fork_offset_position(fork_offset)

    def difference(self, state: StreamState) -> str | None:
        """Idempotent re-create (5.1, 4.2): None when type, expiry, closure and fork origin
        all match `state`, else the header that differs (for the 409's message)."""
        fork = state.fork
        if self.closed != state.closed:
            return "Stream-Closed"
        if self.source is None:
            if fork is not None:
                return "Stream-Forked-From"
            ct = self.content_type or DEFAULT_CONTENT_TYPE
            if media_type(ct) != media_type(state.content_type):
                return "Content-Type"
            if self.ttl != state.ttl:
                return "Stream-TTL"
            if self.expires_at_ts != state.expires_at_ts:
                return "Stream-Expires-At"
            return None
        # A fork inherits type and expiry when the request omits them.
        if fork is None or fork.source != self.source:
            return "Stream-Forked-From"
        if fork.sub_offset != self.sub_offset:
            return "Stream-Fork-Sub-Offset"
        if self.fork_position is not None and (
            self.fork_position != fork.position - fork.sub_offset
        ):
            return "Stream-Fork-Offset"
        if self.content_type is not None and media_type(self.content_type) != media_type(
            state.content_type
        ):
            return "Content-Type"
        if self.ttl is not None and self.ttl != state.ttl:
            return "Stream-TTL"
        if self.expires_at_ts is not None and self.expires_at_ts != state.expires_at_ts:
            return "Stream-Expires-At"
        return None


def source_path(value: str) -> str:
    """`Stream-Forked-From` names the source by URL path (`/v1/stream/a/b`); streams are
    keyed by the decoded path below the prefix (`a/b`), exactly as the gateway keys them,
    so the ring places the source where its requests go."""
    try:
        return stream_path_from_url(value.strip())
    except PathError as exc:
        raise bad_request(f"invalid Stream-Forked-From: {exc}") from None


def _fork_offset_position(token: str) -> int:
    if token == BEGINNING:
        return 0
    position = decode(token)
    if position is None:
        raise bad_request("invalid Stream-Fork-Offset")
    return position


def location(request: Request) -> str:
    """The new stream's URL: absolute when the request says which host it reached."""
    path = STREAM_PREFIX + quote(request.path, safe="/:@!$&'()*+,;=-._~")
    host = request.headers.get("host")
    if not host:
        return path
    scheme = request.headers.get("x-forwarded-proto", "http").split(",", 1)[0].strip()
    return f"{scheme or 'http'}://{host}{path}"


def created_headers(request: Request, state: StreamState, code: int) -> tuple[tuple[str, str], ...]:
    headers = [
        ("content-type", state.content_type),
        ("stream-next-offset", encode(state.tail)),
    ]
    if code == 201:
        headers.append(("location", location(request)))
    if state.closed:
        headers.append(CLOSED)
    return tuple(headers)


def _create(request: Request, state: StreamState | None, now: float) -> Decision:
    params = CreateParams(request)
    code = status(state, now)
    if code == 410:
        raise ProtocolError(409, "path is held by a deleted stream that forks still reference")
    if code == 0 and state is not None:
        differs = params.difference(state)
        if differs is None:
            return Reply(Response(200, created_headers(request, state, 200)))
        raise ProtocolError(409, f"stream exists with a different configuration: {differs}")

    body = request.body
    if params.source is not None:
        if body and params.content_type is not None and is_json(params.content_type):
            # Fail before taking a reference.
            bodies.records(
                params.content_type,
                body,
                0,
                request.body_pieces,
                allow_empty=True,
                defer=request.defer_body,
            )
        elif (
            body
            and params.content_type is None
            and request.defer_body
            and request.body_pieces is None
            and bodies.is_large(body, True)
        ):
            # The fork inherits its type, likely JSON: have the body cut off the loop
            # now (`create_fork` uses the pieces; a binary source ignores a JSON cut).
            return NeedBody(True)
        return NeedSource(params.source, params.fork_offset, params.sub_offset, params.content_type)

    content_type = params.content_type or DEFAULT_CONTENT_TYPE
    records = initial_records(content_type, body, 0, request.body_pieces, defer=request.defer_body)
    new_state = StreamState(
        path=request.path,
        content_type=content_type,
        created_at=now,
        tail=records[-1].end if records else 0,
        closed=params.closed,
        ttl=params.ttl,
        expires_at=params.expires_at,
        expires_at_ts=params.expires_at_ts,
        last_access=now,
    )
    return created(request, new_state, records)


def initial_records(
    content_type: str,
    body: bytes,
    tail: int,
    prepared: BodyPieces | None = None,
    *,
    defer: bool = False,
) -> tuple[Record, ...]:
    """The records a create's body adds at `tail` (none for an empty body or `[]`).
    Pass the request's `body_pieces` as `prepared` (and `defer_body` as `defer` where
    the caller turns BodyDeferred into NeedBody)."""
    if not body:
        return ()
    return bodies.records(content_type, body, tail, prepared, allow_empty=True, defer=defer)


def created(request: Request, state: StreamState, records: tuple[Record, ...]) -> Reply:
    """201 for a new stream (plain or fork): a new incarnation with its first records."""
    return Reply(
        Response(201, created_headers(request, state, 201)),
        changed=True,
        state=state,
        records=records,
        fresh=True,
    )


# ---------------------------------------------------------------------------------------
# GET: catch-up, long-poll, SSE


def _read(
    request: Request,
    state: StreamState | None,
    now: float,
    config: CoreConfig,
    resume: Wait | None,
) -> Decision:
    offset, live, cursor = parse_read_query(request.query)
    if live is not None and live not in ("long-poll", "sse"):
        raise bad_request("invalid live mode: expected long-poll or sse")
    code = status(state, now)
    if code or state is None:
        return _absent(code, "GET")
    if live is not None and offset is None:
        raise bad_request("live reads require an offset")
    tail = state.tail
    position = resume.position if resume is not None else read_position(offset, tail)

    if live is None:
        if offset == NOW:
            return Reply(_now_response(state), touch=True)
        if position >= tail:
            return _empty_read(request, state, position)
        return NeedRecords(position, config.max_read_bytes)
    if live == "sse":
        return StartSse(SseSession(state, position, cursor, now, config))
    # long-poll
    if position < tail:
        return NeedRecords(position, config.max_read_bytes)
    if state.closed:
        return Reply(_poll_done(state, position, None, now, config), touch=True)
    if resume is None:
        return Wait(position, config.long_poll_timeout)
    return Reply(_poll_done(state, position, cursor, now, config), touch=True)


def read_position(offset: str | None, tail: int) -> int:
    """Where a read starts: `-1`/absent = 0, `now` = the tail, else a token we minted."""
    if offset is None or offset == BEGINNING:
        return 0
    if offset == NOW:
        return tail
    position = decode(offset)
    if position is None:
        raise bad_request("invalid offset")
    if position > tail:
        raise bad_request("offset is beyond the end of the stream")
    return position


def _now_response(state: StreamState) -> Response:
    """`offset=now` catch-up (8): no data, the tail, and never cached."""
    headers = [
        ("content-type", state.content_type),
        ("stream-next-offset", encode(state.tail)),
        UP_TO_DATE,
        NO_STORE,
    ]
    if state.closed:
        headers.append(CLOSED)
    return Response(200, tuple(headers), b"[]" if is_json(state.content_type) else b"")


def _empty_read(request: Request, state: StreamState, position: int) -> Reply:
    closed = state.closed
    tag = etag(state, position, position, closed)
    if if_none_match(request.headers, tag):
        return Reply(Response(304, (("etag", tag), CACHE_PUBLIC)), touch=True)
    headers = [
        ("content-type", state.content_type),
        ("stream-next-offset", encode(position)),
        UP_TO_DATE,
        ("etag", tag),
        CACHE_PUBLIC,
    ]
    if closed:
        headers.append(CLOSED)
    body = b"[]" if is_json(state.content_type) else b""
    return Reply(Response(200, tuple(headers), body), touch=True)


def _poll_done(
    state: StreamState, position: int, cursor: str | None, now: float, config: CoreConfig
) -> Response:
    """Long-poll 204: caught up at `position`, EOF if closed, else a cursor to echo."""
    headers = [("stream-next-offset", encode(position)), UP_TO_DATE, NO_STORE]
    if state.closed:
        headers.append(CLOSED)
    else:
        headers.append(("stream-cursor", str(next_cursor(cursor, now, config))))
    return Response(204, tuple(headers))


def finish_read(
    request: Request,
    state: StreamState | None,
    records: list[Record] | tuple[Record, ...],
    now: float,
    config: CoreConfig,
    *,
    resume: Wait | None = None,
) -> Reply:
    """Second half of a read: build the 200 from the records NeedRecords fetched."""
    try:
        offset, live, cursor = parse_read_query(request.query)
        code = status(state, now)
        if code or state is None:
            return _absent(code, "GET")
        tail = state.tail
        position = resume.position if resume is not None else read_position(offset, tail)
    except ProtocolError as err:
        return Reply(err.response())
    json_mode = is_json(state.content_type)
    parts, end = collect(records, position, tail, json_mode)
    up_to_date = end >= tail
    closed = state.closed and up_to_date
    tag = etag(state, position, end, closed)
    if if_none_match(request.headers, tag):
        return Reply(Response(304, (("etag", tag), CACHE_PUBLIC)), touch=True)
    headers = [("content-type", state.content_type), ("stream-next-offset", encode(end))]
    if up_to_date:
        headers.append(UP_TO_DATE)
    if closed:
        headers.append(CLOSED)
    headers.append(("etag", tag))
    headers.append(CACHE_PUBLIC)
    if live == "long-poll":
        headers.append(("stream-cursor", str(next_cursor(cursor, now, config))))
    body = jsonmode.render(parts) if json_mode else b"".join(parts)
    return Reply(Response(200, tuple(headers), body), touch=True)
