"""Values exchanged between the sans-IO protocol core and the shard runtime.

The core never touches a socket, a file or a clock: the runtime hands it a `Request`,
the stream's current `StreamState` (or None), the time, and when asked for them the
stream's `Record`s; the core answers with a `Decision`. A decision that changes the
stream carries the *whole new state* and the records to add; the runtime persists
exactly that (one transaction, group-committed) before it sends the response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class CoreConfig:
    """Protocol knobs a deployment may tune."""

    long_poll_timeout: float = 30.0  # seconds a long-poll waits before 204
    sse_max_duration: float = 60.0  # seconds before the server ends an SSE response
    max_read_bytes: int = 1024 * 1024  # catch-up chunk size (one record may exceed it)
    cursor_epoch: float = 1728432000.0  # 2024-10-09T00:00:00Z, per PROTOCOL.md 10.1
    cursor_interval: float = 20.0


_new = object.__new__
_set_attribute = object.__setattr__

# The values built for every request (Request, Reply, Response) are frozen dataclasses
# with a hand-written __init__ that fills the instance dict directly: the generated
# frozen __init__ goes through object.__setattr__ per field, which cost about 1-2.5 us
# per object, several times per append. Those read most (Request, Reply) are given a
# dict of their own whole: the instance dict that `self.__dict__` makes is a split one
# (keys shared with the class), and Python 3.11 specializes no attribute load on such an
# instance, so each of their reads took the generic lookup (about 250 instructions
# more); the dict costs about 1k per object, paid back from the fifth read (an append
# reads its Request about nine times). A Record, made for every append, has slots.


@dataclass(frozen=True, init=False)
class Request:
    """One HTTP request on a stream, already stripped of transport details.

    `path` is the stream path without the `/v1/stream/` prefix ("a/b"); `query` is the raw
    query string (the core parses it); header names are lower-case.
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    # The runtime can cut large bodies off its event loop: with `defer_body`, the core
    # answers `NeedBody` instead of cutting a large body itself, once it knows the body
    # is needed; the runtime then passes the cut in `body_pieces` (see core.bodies).
    defer_body: bool
    body_pieces: BodyPieces | None

    def __init__(
        self,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        defer_body: bool = False,
        body_pieces: BodyPieces | None = None,
    ) -> None:
        _set_attribute(
            self,
            "__dict__",
            {
                "method": method,
                "path": path,
                "query": query,
                "headers": {} if headers is None else headers,
                "body": body,
                "defer_body": defer_body,
                "body_pieces": body_pieces,
            },
        )


@dataclass(frozen=True)
class BodyPieces:
    """A request body cut into record pieces: `(data, positions covered)` in order.

    What `core.bodies.prepare` computes from `body`, with the same pure functions the
    core uses inline; the runtime builds it off its event loop (`shard.offload`). `json`
    says which cut it is (the core ignores pieces of the wrong kind); `error` is the 400
    message for a JSON body that is invalid."""

    json: bool
    pieces: tuple[tuple[bytes, int], ...] = ()
    error: str | None = None


@dataclass(frozen=True, init=False)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def __init__(
        self, status: int, headers: tuple[tuple[str, str], ...] = (), body: bytes = b""
    ) -> None:
        d = self.__dict__
        d["status"] = status
        d["headers"] = headers
        d["body"] = body


@dataclass(slots=True, init=False, unsafe_hash=True)
class Record:
    """A stored run of stream data covering positions [start, end).

    Positions are the core's own integer coordinates (offsets are their encoding); what a
    record's bytes mean (raw bytes, or JSON messages) is the core's business, the
    runtime only stores and returns them in order.

    Never changed once made, though not frozen: a frozen class's `__init__` must set
    each field through `object.__setattr__` (about 1.3k instructions each), and every
    append makes one. With slots, making one cost 2.0k instructions where the frozen
    class with its dict given whole cost 4.3k, and its fields read as fast.
    """

    start: int
    end: int
    data: bytes

    def __init__(self, start: int, end: int, data: bytes) -> None:
        self.start = start
        self.end = end
        self.data = data


@dataclass(frozen=True)
class ProducerState:
    epoch: int
    last_seq: int


@dataclass(frozen=True)
class ForkOrigin:
    """Where a fork came from. `ref` is the id of the reference held on the source.

    A `linked` fork stores only its own records (from `position` on) and reads the ones
    below `position` from its source, through `ref`; forks made before linking existed
    hold a copy of their inherited records (`linked` False)."""

    source: str
    offset: str  # the fork offset as the client gave it (or the source tail), for idempotency
    sub_offset: int
    position: int  # the divergence position; the fork's data below it was inherited
    ref: str
    linked: bool = False


@dataclass(slots=True, unsafe_hash=True)
class StreamState:
    """Everything the protocol needs to know about one stream, apart from its data.

    Never changed once made, though not frozen (as `Record`): every append makes one
    (`advance`), and a frozen class's instance can be copied only through its dict, which
    Python 3.11 makes anew when given (an instance's inline values are materialized
    first). With slots, a copy is one store per field (`_copy`), and every read of a
    field is a slot load."""

    path: str
    content_type: str
    created_at: float  # unix seconds; also makes the stream's identity for ETags
    tail: int = 0  # the next position to be written
    closed: bool = False
    ttl: int | None = None  # sliding expiry window, seconds
    expires_at: str | None = None  # absolute expiry as given (RFC 3339), echoed on HEAD
    expires_at_ts: float | None = None  # the same as unix seconds
    last_access: float = 0.0  # last read or write, for TTL
    last_stream_seq: str | None = None
    closed_by: tuple[str, int, int] | None = None  # (producer id, epoch, seq) that closed it
    producers: Mapping[str, ProducerState] = field(default_factory=dict)
    fork: ForkOrigin | None = None
    soft_deleted: bool = False
    refcount: int = 0  # live forks that reference this stream

    def deadline(self) -> float | None:
        """When this stream expires (unix seconds), or None; the runtime arms alarms on it.

        None once soft-deleted: such a stream is already deleted and is purged when its
        last fork lets go (release_fork), not by the alarm."""
        if self.soft_deleted:
            return None
        candidates = []
        if self.ttl is not None:
            candidates.append(self.last_access + self.ttl)
        if self.expires_at_ts is not None:
            candidates.append(self.expires_at_ts)
        return min(candidates) if candidates else None


def _copy(state: StreamState) -> StreamState:
    """A copy of `state`, field by field, without the generated `__init__` (its
    defaults and keyword handling): what `evolve` and `advance` change."""
    new = _new(StreamState)
    new.path = state.path
    new.content_type = state.content_type
    new.created_at = state.created_at
    new.tail = state.tail
    new.closed = state.closed
    new.ttl = state.ttl
    new.expires_at = state.expires_at
    new.expires_at_ts = state.expires_at_ts
    new.last_access = state.last_access
    new.last_stream_seq = state.last_stream_seq
    new.closed_by = state.closed_by
    new.producers = state.producers
    new.fork = state.fork
    new.soft_deleted = state.soft_deleted
    new.refcount = state.refcount
    return new


def evolve(state: StreamState, **changes: object) -> StreamState:
    """`dataclasses.replace` for the hot path: a copy of `state` with `changes` applied.

    `replace` re-runs field introspection and the generated `__init__` (~8 us for this
    class); `_copy` stores each field once. A name that is not a field is refused
    (AttributeError: the class has slots)."""
    new = _copy(state)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


def advance(state: StreamState, tail: int, now: float) -> StreamState:
    """`evolve(state, tail=tail, closed=False, closed_by=None, last_access=now)`, what a
    plain append changes (core.protocol's fast lane), without the keyword dict.

    `_copy` written out with the four changed fields stored once: without the call and
    the four stores that overwrote copied fields, 4.0k -> 3.2k instructions (callgrind)."""
    new = _new(StreamState)
    new.path = state.path
    new.content_type = state.content_type
    new.created_at = state.created_at
    new.tail = tail
    new.closed = False
    new.ttl = state.ttl
    new.expires_at = state.expires_at
    new.expires_at_ts = state.expires_at_ts
    new.last_access = now
    new.last_stream_seq = state.last_stream_seq
    new.closed_by = None
    new.producers = state.producers
    new.fork = state.fork
    new.soft_deleted = state.soft_deleted
    new.refcount = state.refcount
    return new


# ---------------------------------------------------------------------------------------
# Decisions: what the core tells the runtime to do next.


@dataclass(frozen=True, init=False)
class Reply:
    """Final answer. If `changed`, persist `state` (None = purge the stream and all its
    data) and append `records`, commit, and only then send `response`."""

    response: Response
    changed: bool
    state: StreamState | None
    records: tuple[Record, ...]
    touch: bool  # a read on an existing stream: refresh last_access (sliding TTL)
    fresh: bool  # with changed: a new incarnation replaces whatever is stored

    def __init__(
        self,
        response: Response,
        changed: bool = False,
        state: StreamState | None = None,
        records: tuple[Record, ...] = (),
        touch: bool = False,
        fresh: bool = False,
    ) -> None:
        _set_attribute(
            self,
            "__dict__",
            {
                "response": response,
                "changed": changed,
                "state": state,
                "records": records,
                "touch": touch,
                "fresh": fresh,
            },
        )


@dataclass(frozen=True)
class NeedRecords:
    """Fetch committed records with end > `position`, in order, stopping once at least
    `max_bytes` of data is gathered (always at least one record if any exists), then call
    `core.finish_read(request, state, records, now, config)`."""

    position: int
    max_bytes: int


@dataclass(frozen=True)
class Wait:
    """Long-poll: wait until the stream's committed tail passes `position`, the stream
    closes or disappears, or `timeout` seconds pass; then call `core.handle` again with
    `resume=` this Wait (the committed state then says which of these happened)."""

    position: int
    timeout: float


@dataclass(frozen=True)
class NeedSource:
    """Fork creation: ask the source's owner (`core.export_fork` there) for the inherited
    data, then call `core.create_fork(request, export, now, config)`."""

    source: str
    offset: str | None  # None = the source's tail
    sub_offset: int
    content_type: str | None = None  # requested type: pass to plan_export/export_fork


class LiveSession(Protocol):
    """What the runtime drives of an SSE response: `core.sse.SseSession` (a protocol, so
    that this module need not import the one that imports it)."""

    head: Response
    position: int  # what has been sent
    read_bytes: int  # how much to fetch for the next step
    done: bool
    ends_at: float

    def step(self, state: StreamState | None, records: Iterable[Record], now: float) -> bytes: ...


@dataclass(frozen=True)
class StartSse:
    """Send `session.head`, then drive `session` (see core.sse.SseSession)."""

    session: LiveSession


@dataclass(frozen=True)
class NeedBody:
    """The request's body is large and must be read: cut it off the event loop
    (`core.bodies.prepare(request.body, json)`), then call `core.handle` again with the
    result as `request.body_pieces` (and the state as it is then). Only answered to a
    request with `defer_body` set."""

    json: bool


Decision = Reply | NeedRecords | Wait | NeedSource | StartSse | NeedBody


@dataclass(frozen=True)
class ForkExport:
    """What the source's shard hands the fork's shard: the source's settings and the
    divergence position. No data: the fork reads [0, position) from the source."""

    content_type: str
    ttl: int | None
    expires_at: str | None
    expires_at_ts: float | None
    offset: str
    sub_offset: int
    position: int
