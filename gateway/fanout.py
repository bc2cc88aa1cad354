"""Shared SSE upstreams: clients reading the same SSE are fed from one shard call.

A thousand SSE readers of one stream would otherwise hold a thousand shard calls, each
woken for every event, each rendering and sending the same bytes. Here the gateway holds
one upstream per key (stream path, raw query string, forwarded headers); its pump task,
in the gateway-level nursery, frames each chunk for HTTP/1.1 chunked transfer once and
hands the same bytes to every subscriber, which writes them to its client without a
task of its own (see `SseClient` in `gateway.http1`).

Joining late: a request whose key matches a running upstream joins it while everything
the upstream relayed so far (its prefix) is at most PREFIX_LIMIT bytes. The newcomer gets
the upstream's response head and that prefix, then what follows. That is what it would
have read on its own: an SSE read from an offset delivers everything after the offset,
and the replay of an earlier read from the same offset is exactly that (control events
carry the newest offset last). Reads from `offset=now` start where the stream is when
they are asked, so they are never shared (the caller passes no key).

The last subscriber leaving cancels the upstream call (the shard is told `cancel`); the
upstream ending (stream closed, the shard's SSE lifetime, a lost shard connection) ends
every subscriber's response, and clients resume from their last offset. A stream moving
to another shard (a ring change) does not end it: its old owner ends the call with `err
moving` (or `misdirected`), and the upstream reads on at the owner under the newest ring
from the last control event's `streamNextOffset` it relayed, so its clients see neither a
gap nor a duplicate (at most a repeated control event).

The pump never waits for a client: the shard call's inbox stays empty, and each
subscriber bounds its own backlog. Native HTTP/1.1 clients get chunk-framed bytes
(`gateway.http1.SseClient`); ASGI clients (HTTP/2, HTTP/1.0, percent-encoded queries)
join upstreams of their own that relay raw bytes, each read by a `QueuedSubscriber`.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, Protocol
from urllib.parse import unquote_plus

import trio

from ds_cluster.common import wire
from ds_cluster.common.rpc_client import Call, ShardError, ShardUnavailable
from ds_cluster.gateway import framing
from ds_cluster.gateway.answers import Answer
from ds_cluster.gateway.budget import MAX_BEHIND, ConnectionOutput

log = logging.getLogger(__name__)

PREFIX_LIMIT = 64 * 1024  # bytes an upstream may have relayed and still take newcomers
RESUMABLE = frozenset({"moving", "misdirected", "version"})  # a stream's owner changed
MAX_RESUMES = 8  # owner changes one upstream follows (each retried ~2 s by the pool)
# SSE framing (PROTOCOL.md 5.8): events end in a blank line, so a control event starts a
# chunk or follows "\n\n"; a data event's payload cannot hold "\n\n" (each line of it is
# prefixed "data:"), so no payload passes for a control event.
_CONTROL = b"event: control\ndata:"
_NEXT_OFFSET = b'"streamNextOffset":"'
_OFFSET = re.compile(rb"[A-Za-z0-9_.~-]{1,64}")  # what may go back into a query unquoted

Head = tuple[int, list[tuple[bytes, bytes]]]  # status, response headers


class Subscriber(Protocol):
    """One client of an upstream. Both calls come from the upstream's task, must not
    block, and must not raise."""

    def deliver(self, frame: bytes) -> None:
        """Bytes for the client, already framed as HTTP/1.1 chunks."""

    def end(self) -> None:
        """The upstream is over: finish the response."""


class Streaming:
    """A joined SSE response: write the head (`status`, `headers`), then `prefix`, then
    the frames delivered to the subscriber; call `leave` when the client goes
    (idempotent). Slotted, with no closure: one is held for every SSE client."""

    __slots__ = ("_fanout", "_key", "_sub", "_upstream", "headers", "prefix", "status")

    def __init__(
        self,
        fanout: SseFanout,
        key: Hashable | None,
        upstream: _Upstream,
        sub: Subscriber,
        head: Head,
        prefix: bytes,
    ) -> None:
        self.status, self.headers = head
        self.prefix = prefix
        self._fanout = fanout
        self._key = key
        self._upstream = upstream
        self._sub = sub

    def leave(self) -> None:
        self._fanout._leave(self._key, self._upstream, self._sub)


class _Upstream:
    """One shard call and the clients it feeds."""

    __slots__ = (
        "answer",
        "control",
        "framed",
        "head",
        "joinable",
        "prefix",
        "ready",
        "scope",
        "size",
        "subscribers",
    )

    def __init__(self, framed: bool) -> None:
        self.framed = framed  # relayed as HTTP/1.1 chunks (else raw)
        self.head: Head | None = None  # set once the shard answered with a stream
        self.answer: Answer | None = None  # set instead when it answered anything else
        self.ready = trio.Event()  # head or answer is known
        self.prefix: list[bytes] = []  # frames relayed so far, while joinable
        self.size = 0
        self.joinable = True
        # The last chunk relayed that holds a control event: a resumed read goes on from
        # its last streamNextOffset (parsed then, not for every chunk: about 9k
        # instructions per message).
        self.control = b""
        self.subscribers: set[Subscriber] = set()
        self.scope = trio.CancelScope()  # the pump's; cancelled when the last client leaves


class SseFanout:
    """Runs shared upstreams. `open_call(route, fields)` starts a shard call on the owner
    of `route` (a stream path);
    `render(res)` turns its first `res` frame into the response head; `answer(res)` /
    `failure(exc)` into the complete answer when it does not stream or fails."""

    def __init__(
        self,
        nursery: trio.Nursery,
        open_call: Callable[[str, dict[str, Any]], Awaitable[Call]],
        render: Callable[[wire.ResponseFrame], Head],
        answer: Callable[[wire.ResponseFrame], Answer],
        failure: Callable[[ShardUnavailable | ShardError], Answer],
        failed: Answer,
    ) -> None:
        self._nursery = nursery
        self._open = open_call
        self._render = render
        self._answer = answer
        self._failure = failure
        self._failed = failed
        self._upstreams: dict[Hashable, _Upstream] = {}  # those that take newcomers
        self._running: set[_Upstream] = set()  # every upstream whose pump runs

    def upstreams(self) -> int:
        """Shard calls running now (for metrics)."""
        return len(self._running)

    def subscribers(self) -> int:
        """Clients of all upstreams now (for metrics)."""
        return sum(len(upstream.subscribers) for upstream in self._running)

    async def join(
        self,
        key: Hashable | None,
        route: str,
        fields: dict[str, Any],
        sub: Subscriber,
        framed: bool = True,
    ) -> Streaming | Answer:
        """Subscribe `sub` to the upstream for `key` (a new one when there is none that
        takes newcomers, or when `key` is None), and return how its response starts; or
        the complete answer when the shard does not stream (an error, a 404). `framed`:
        the subscriber takes HTTP/1.1 chunks (else raw bytes; such upstreams are apart)."""
        if key is not None:
            key = (framed, key)
        upstream = self._upstreams.get(key) if key is not None else None
        if upstream is None:
            upstream = _Upstream(framed)
            if key is not None:
                self._upstreams[key] = upstream
            self._nursery.start_soon(self._pump, key, upstream, route, fields)
        prefix = b"".join(upstream.prefix)  # relayed before `sub` came: sent as the prefix
        upstream.subscribers.add(sub)
        try:
            await upstream.ready.wait()
        except BaseException:
            self._leave(key, upstream, sub)
            raise
        if upstream.head is None:
            self._leave(key, upstream, sub)
            return upstream.answer or self._failed
        return Streaming(self, key, upstream, sub, upstream.head, prefix)

    def _leave(self, key: Hashable | None, upstream: _Upstream, sub: Subscriber) -> None:
        """`sub` leaves `upstream` (if it is still there); the last one ends it."""
        subscribers = upstream.subscribers
        if sub not in subscribers:
            return
        subscribers.discard(sub)
        if not subscribers:
            self._close(key, upstream)
            upstream.scope.cancel()

    def _close(self, key: Hashable | None, upstream: _Upstream) -> None:
        """Take no more newcomers."""
        upstream.joinable = False
        upstream.prefix = []
        if key is not None and self._upstreams.get(key) is upstream:
            del self._upstreams[key]

    async def _pump(
        self, key: Hashable | None, upstream: _Upstream, route: str, fields: dict[str, Any]
    ) -> None:
        self._running.add(upstream)
        try:
            with upstream.scope:
                resumes = 0
                while True:
                    try:
                        return await self._relay_call(key, upstream, route, fields)
                    except ShardError as exc:
                        # The stream moved to another shard under the reader: read on
                        # there from the last offset relayed (no gap, no duplicate).
                        if upstream.head is None or exc.code not in RESUMABLE:
                            raise
                        if resumes >= MAX_RESUMES:
                            raise
                        resumes += 1
                        offset = None
                        if upstream.control:
                            offset = _last_offset(upstream.control)
                            if offset is None:
                                raise  # no sound offset to go on from: the clients resume
                        log.info("SSE upstream on %r: %s; resuming on its owner", route, exc)
                        fields = _resumed(fields, offset)
        except (ShardUnavailable, ShardError) as exc:
            if upstream.head is None:
                upstream.answer = self._failure(exc)
        except Exception:  # a bug here must not take the gateway's nursery down
            log.exception("shared SSE upstream failed")
        finally:
            self._running.discard(upstream)
            self._close(key, upstream)
            if upstream.head is None:
                upstream.answer = upstream.answer or self._failed
                upstream.ready.set()  # the waiting joiners take the answer and leave
            else:
                for sub in list(upstream.subscribers):
                    _call(sub.end)
                upstream.subscribers.clear()

    async def _relay_call(
        self, key: Hashable | None, upstream: _Upstream, route: str, fields: dict[str, Any]
    ) -> None:
        """One shard call of the upstream: its head (unless resuming), then its bytes."""
        async with await self._open(route, fields) as call:
            res = await call.response()
            if upstream.head is None:
                if not res.get("more"):
                    upstream.answer = self._answer(res)
                    return
                upstream.head = self._render(res)
                upstream.ready.set()
            elif not res.get("more"):
                return  # a resumed read that does not stream (say, deleted meanwhile): end
            body = res.get("b")
            del res
            if body:
                self._relay(key, upstream, body)
            del body
            # Each chunk is relayed by the connection's reader as it arrives.
            await call.relay(partial(self._relay, key, upstream))

    def _relay(self, key: Hashable | None, upstream: _Upstream, data: bytes) -> None:
        if _CONTROL in data:  # (its offset is read only if the upstream resumes)
            upstream.control = data
        frame = framing.chunk(data) if upstream.framed else data
        if upstream.joinable:
            upstream.prefix.append(frame)
            upstream.size += len(frame)
            if upstream.size > PREFIX_LIMIT:
                self._close(key, upstream)
        for sub in tuple(upstream.subscribers):  # a delivery may drop its subscriber
            try:
                sub.deliver(frame)
            except Exception:  # a bug to log, not a reason to fail the other subscribers
                log.exception("SSE subscriber failed")


class QueuedSubscriber:
    """A client whose own task writes what the upstream delivers (the ASGI path).

    Frames wait in a queue counted in the connection's output budget; the client's task
    takes them with `next()` inside `scope`, and calls `sent()` once each is written. A
    client more than MAX_BEHIND bytes behind, or over budget, is dropped: its queue is
    released, `scope` is cancelled (a write stuck on a client that does not read is
    abandoned), and `dropped` tells the task not to end the response normally.
    """

    __slots__ = ("_output", "_queue", "_queued", "_wake", "dropped", "ended", "scope")

    def __init__(self, output: ConnectionOutput) -> None:
        self._output = output
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes delivered and not yet sent (the one being sent included)
        self._wake = trio.Event()
        self.ended = False
        self.dropped = False
        self.scope = trio.CancelScope()

    def deliver(self, frame: bytes) -> None:
        if self.ended:
            return
        if self._queued > MAX_BEHIND or not self._output.admit(len(frame)):
            log.info("SSE client dropped: %d bytes behind", self._queued)
            self.dropped = self.ended = True
            self._queue.clear()
            self._output.release(self._queued)
            self._queued = 0
            self.scope.cancel()
            return
        self._queue.append(frame)
        self._queued += len(frame)
        self._wake.set()

    def end(self) -> None:
        self.ended = True
        self._wake.set()

    async def next(self) -> bytes | None:
        """The next frame; None once the upstream ended (or the client was dropped)."""
        while not self._queue:
            if self.ended:
                return None
            await self._wake.wait()
            self._wake = trio.Event()
        return self._queue.popleft()

    def sent(self, frame: bytes) -> None:
        """`frame` (from `next`) is written."""
        if not self.dropped:
            self._queued -= len(frame)
            self._output.release(len(frame))


def _call(fn: Callable[..., None], *args: Any) -> None:
    """A subscriber's callback, which must not raise; if it does, it is a bug to log,
    not a reason to fail the other subscribers."""
    try:
        fn(*args)
    except Exception:
        log.exception("SSE subscriber failed")


def _last_offset(data: bytes) -> str | None:
    """The `streamNextOffset` of the last control event in `data` (whole SSE events, as
    a shard sends them), or None when there is none."""
    at = data.rfind(b"\n\n" + _CONTROL)
    if at >= 0:
        at += 2
    elif not data.startswith(_CONTROL):
        return None
    start = data.find(_NEXT_OFFSET, at)
    if start < 0:
        return None
    start += len(_NEXT_OFFSET)
    end = data.find(b'"', start, start + 65)
    match = _OFFSET.fullmatch(data, start, end) if end > 0 else None
    return match.group().decode() if match else None


def _resumed(fields: dict[str, Any], offset: str | None) -> dict[str, Any]:
    """The `http` fields of an SSE read that goes on from `offset` (the original read's
    fields when nothing was relayed yet): its query with `offset` replaced."""
    query: str = fields["q"]
    if offset is not None:
        kept = [
            part
            for part in query.split("&")
            if part and unquote_plus(part.partition("=")[0]) != "offset"
        ]
        query = "&".join([*kept, f"offset={offset}"])
    return {"m": fields["m"], "p": fields["p"], "q": query, "h": fields["h"], "b": b""}
