"""Multiplexed RPC client to shards: one persistent connection per shard, many calls on it.

Used by the gateway (op="http") and by shards calling each other (export_fork,
release_fork); it knows nothing about HTTP.

    async with ShardPool(endpoints, ring, role="gateway", name="gw-1", secret=secret) as pool:
        # simple ops: one result map
        result = await pool.call("s1", "export_fork", {...}, timeout=5)
        # requests with a (possibly streaming) response
        async with pool.open("s1", "http", {"m": "GET", "p": "a", ...}) as call:
            res = await call.response()        # the `res` frame: s, h, b, more
            async for data in call.chunks():   # `chunk` bodies while more
                ...
        # the same, sent to whichever shard owns `path` under the newest ring
        async with await pool.open_routed("a", "http", {...}) as call:
            ...

The pool follows the ring (see common/ring.py): it holds the newest ring it has seen
(`pool.rings`, a RingHolder), learned from the shards' `ready` frames and from `err`
answers that carry one, and keeps one connection per shard of that ring: a new ring's
new shards are connected, the connections of shards that left it are closed, without a
restart. `open_routed` hides a ring change from its caller: it retries on the owner under
the newer ring (`err misdirected`, `err version`), brings a shard on an older ring up to
date first (`ring_set`), and waits out a stream that is moving (`err moving`), all within
ROUTE_DEADLINE seconds.

Each connection runs its tasks in the pool's nursery: a supervisor that connects
(exponential backoff, 50 ms doubling to 0.5 s, jittered; optionally TLS) and runs the
mutual authentication of common/cluster_auth.py, then a reader that dispatches frames by
request id into per-call inboxes and the writer of common/rpc_transport.py. The state of
the connection and of each request is the sans-IO core's (common/rpc_core.py). A shard
that fails authentication or claims another id is not used; `ShardPool.problems()` says
why, for readiness.

Failure model, so callers never hang and never guess:
  * shard not connected: `open`/`call` raise ShardUnavailable(sent=False) at once;
  * connection drops: every call in flight on it fails at once with ShardUnavailable;
    `sent` says whether its request frame was handed to the socket (True: the outcome is
    unknown, the shard may have acted; False: it certainly did not);
  * the shard answers `err`: ShardError(code, msg, args);
  * leaving `open(...)` before the response is complete sends `cancel` to the shard.
  * the shard stops answering (hung, SIGSTOPped, link blackholed): a `ping` op every
    HEARTBEAT_INTERVAL s unanswered for HEARTBEAT_TIMEOUT s drops the connection, which
    fails the calls on it as above;
  * more than MAX_QUEUED request bytes waiting to be written to one shard: `open` raises
    ShardUnavailable(sent=False) (the shard is not keeping up).
A streaming response whose unread chunks exceed `max_buffered` bytes (a consumer slower
than the shard) is cancelled on the shard and fails with ShardUnavailable(sent=True).
Frames from the shard are checked by `wire.parse`; one that breaks the protocol (a second
`res` for a call, a chunk before its `res`, a kind a shard never sends) drops the
connection, as a lost connection does: a broken or hostile shard cannot crash a caller.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TypeVar

import trio

from ds_cluster.common import rpc_core, wire
from ds_cluster.common.backoff import jittered
from ds_cluster.common.cluster_auth import AuthError, ClientHandshake
from ds_cluster.common.ring import Endpoint, Ring, RingHolder
from ds_cluster.common.rpc_transport import FrameReader, FrameWriter

log = logging.getLogger(__name__)

_T = TypeVar("_T")

BACKOFF_MIN = 0.05
BACKOFF_MAX = 0.5  # a restarted shard is reconnected within half a second of listening
HELLO_TIMEOUT = 5.0
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 8.0  # a busy shard (thousands of cancels at once) is not a hung one
PING_GRACE = 1.0  # extra wait for a ping answer after our own loop may have stalled
MAX_BUFFERED = 16 * 1024 * 1024
MAX_QUEUED = 256 * 1024 * 1024  # request bytes queued for one shard before `open` refuses
ROUTE_DEADLINE = 2.0  # seconds `open_routed` keeps retrying a ring change or a move
ROUTE_BACKOFF = 0.05  # first pause between such retries (doubling, jittered)
MAX_RETRY_AFTER = 1.0  # longest pause a shard's `moving` answer may ask of one retry
DEPART_GRACE = 90.0  # seconds a departed shard's calls in flight get (a held SSE, say)


class ShardUnavailable(Exception):
    """The shard could not answer. `sent`: whether the request may have reached it."""

    def __init__(self, shard_id: str, reason: str, *, sent: bool) -> None:
        super().__init__(f"shard {shard_id} unavailable: {reason}")
        self.shard_id = shard_id
        self.reason = reason
        self.sent = sent


class ShardTimeout(ShardUnavailable):
    """A `call` got no answer in time (outcome unknown; the call was cancelled)."""


class ShardError(Exception):
    """The shard answered the request with an `err` frame (`args`: its `a`, if any)."""

    def __init__(self, code: str, msg: str, args: wire.Args | None = None) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.args_map: wire.Args = args or {}

    @property
    def retry_after(self) -> float:
        """What an `err moving` asks the caller to wait before retrying, in seconds."""
        return retry_after(self.args_map)


def retry_after(args: wire.Args) -> float:
    """The `retry_after` seconds of an `err moving`'s `a` (1 when absent or malformed)."""
    value = args.get("retry_after")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return 1.0


class _Stop:
    """Why a call's inbox ends without a frame (a sentinel, put by the connection)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


# trio's calls of a call's wait and wake, bound once (looked up per request otherwise)
_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule

_DROPPED = _Stop("connection lost")
_OVERFLOW = _Stop("consumer too slow")
Delivered = wire.Frame | _Stop
RingSink = Callable[[object, str], None]  # (a RingInfo heard of, from which shard)
# A request's fields as `wire.RequestFields` describes them (m, p, q, h, b; or a); any
# mapping of that shape, so callers need not spell the TypedDict.
Fields = wire.RequestFields | Mapping[str, object]


class Call(rpc_core.CallState):
    """One request in flight. Created by ShardConnection.open, which sets every field:
    Python 3.11 runs a class's own `__init__` through a slow generic call, and one call
    is made per request (`object.__init__` leaves the class call its fast path)."""

    __slots__ = ("_conn", "_inbox", "_waiter", "buffered", "done", "early", "first", "sink")

    __init__ = object.__init__

    # What each field holds, beside CallState's id, answered and sent:
    _conn: ShardConnection
    # The frames the connection's reader delivered and the task parked for the next one:
    # a deque and a task instead of a memory channel. The deque is made with the first
    # frame a caller is to read (None until then): an append whose answer its `first`
    # took never makes one (a deque and its block cost about 1k instructions).
    _inbox: deque[Delivered] | None
    _waiter: trio.lowlevel.Task | None
    done: bool  # the final frame (or an error) has been received
    buffered: int  # bytes of chunk bodies delivered but not yet consumed
    # While `relay` waits: takes each chunk body from the connection's reader.
    sink: Callable[[bytes], None] | None
    # Given a complete `res` (more=False) by the connection's reader as it arrives,
    # before the frame goes to the inbox (`open_routed`'s `early`).
    early: Callable[[wire.ResponseFrame], None] | None
    # Given the first item delivered, whatever it is (a frame, or the connection's
    # loss), by the connection's reader, before it goes to the inbox: a caller that
    # does not wait for it (`ShardPool.send_routed`) learns of it there. It returns
    # True when it took the item for good (a complete answer it served: nobody reads
    # the call after it), which then goes no further.
    first: Callable[[Delivered], bool | None] | None

    @property
    def shard_id(self) -> str:
        return self._conn.shard_id

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Leave the call (what leaving `async with call` does, without a coroutine): if
        its response is not complete, the shard is told to stop."""
        if not self.done:
            self.done = True
            self._conn._abandon(self)

    def _put(self, item: Delivered) -> None:
        """Deliver a frame (or a sentinel); called by the connection, never blocks."""
        first = self.first
        if first is not None:
            self.first = None
            try:  # (`_hand`, written out: every append's answer passes here)
                if first(item):
                    return
            except Exception:
                log.exception("a call's sink failed")
        early = self.early
        if early is not None and type(item) is dict and item["k"] == "res" and not item["more"]:
            self.early = None
            _hand(early, item)
        inbox = self._inbox
        if inbox is None:
            self._inbox = deque((item,))
        else:
            inbox.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            _reschedule(waiter)

    async def _next(self) -> Delivered:
        """The next delivered item, waiting for it if none is there yet."""
        inbox = self._inbox
        if not inbox:
            self._waiter = _current_task()
            await _wait_task_rescheduled(self._abort_wait)
            inbox = self._inbox  # (`_put` woke it: one was made)
            assert inbox is not None
        return inbox.popleft()

    def _abort_wait(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _unavailable(self, stop: _Stop) -> ShardUnavailable:
        self.done = True
        if stop is _OVERFLOW:
            return ShardUnavailable(self._conn.shard_id, stop.reason, sent=True)
        reason = "connection lost" if self.sent else "connection lost before sending"
        return ShardUnavailable(self._conn.shard_id, reason, sent=self.sent)

    async def response(self) -> wire.ResponseFrame:
        """The `res` frame (s, h, b, more; or `a` for non-http ops). Cancel-safe."""
        inbox = self._inbox  # (after `open_routed` the frame is there: no wait to await)
        msg = inbox.popleft() if inbox else await self._next()
        if isinstance(msg, _Stop):
            raise self._unavailable(msg)
        if msg["k"] == "res":
            if not msg["more"]:
                self.done = True
            return msg
        self.done = True
        if msg["k"] == "err":
            raise ShardError(msg["code"], msg["msg"], msg.get("a"))
        raise ShardError("internal", f"unexpected {msg['k']!r} frame before the response")

    def _chunk_body(self, msg: Delivered) -> bytes:
        """The body of a `chunk` frame of this stream, counted off the buffered bytes (the
        last chunk ends the stream); a stop, an `err` or any other frame raises."""
        if isinstance(msg, _Stop):
            raise self._unavailable(msg)
        if msg["k"] == "err":
            self.done = True
            raise ShardError(msg["code"], msg["msg"], msg.get("a"))
        if msg["k"] != "chunk":
            self.done = True
            raise ShardError("internal", f"unexpected {msg['k']!r} frame in a stream")
        body: bytes = msg["b"]
        self.buffered -= len(body)
        if not msg["more"]:
            self.done = True
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """Bodies of the `chunk` frames that follow a `res` with more=True."""
        while not self.done:
            msg = await self._next()
            body = self._chunk_body(msg)
            if body:
                yield body

    async def relay(self, sink: Callable[[bytes], None]) -> None:
        """Hand the bodies of the `chunk` frames that follow a `res` with more=True to
        `sink`, until the stream ends; raises as `chunks` does. While nothing waits in
        the inbox, the connection's reader calls `sink` itself as each chunk arrives: no
        task switch per chunk and nothing buffered. `sink` must not block; what it
        raises is logged (and that chunk lost to it)."""
        while not self.done:
            inbox = self._inbox
            if inbox:
                msg = inbox.popleft()
            else:
                self.sink = sink
                try:
                    msg = await self._next()
                finally:
                    self.sink = None
            body = self._chunk_body(msg)
            if body:
                _hand(sink, body)


class ShardConnection:
    """The persistent, multiplexed connection to one shard. Run by a ShardPool."""

    def __init__(
        self,
        shard_id: str,
        address: Endpoint,
        *,
        role: str,
        name: str,
        rings: RingHolder,
        secret: bytes,
        ssl_context: ssl.SSLContext | None = None,
        max_buffered: int = MAX_BUFFERED,
        heartbeat: tuple[float, float] | None = (HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT),
    ) -> None:
        self.shard_id = shard_id
        self._heartbeat = heartbeat
        self._hello_timeout = heartbeat[1] if heartbeat is not None else HELLO_TIMEOUT
        self.address = address
        self._role = role
        self._name = name
        self._rings = rings
        self._secret = secret
        self._ssl_context = ssl_context
        self._max_buffered = max_buffered
        self._protocol: rpc_core.CallerProtocol[Call] | None = None  # while connected
        self._writer: FrameWriter | None = None
        self.problem = "not connected yet"  # why not connected (for readiness)
        self.tried = False  # a first connection attempt has ended (either way)
        self.health: dict[str, str] = {}  # the shard's last health report (ready, pings)
        self.connected_event = trio.Event()  # set while connected; replaced when lost
        self.scope = trio.CancelScope()  # cancelled when the shard leaves the ring
        self._drained: trio.Event | None = None  # set when in_flight reaches 0 (`drained`)

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    @property
    def in_flight(self) -> int:
        """Requests sent or queued and not yet complete."""
        return len(self._protocol.pending) if self._protocol is not None else 0

    async def drained(self) -> None:
        """Return once no request is in flight (for a connection given no new ones)."""
        while self.in_flight:
            self._drained = trio.Event()
            await self._drained.wait()

    def _check_drained(self) -> None:
        if self._drained is not None and not self.in_flight:
            self._drained.set()
            self._drained = None

    # -- calls -----------------------------------------------------------------------

    def open(
        self, op: str, fields: Fields, first: Callable[[Delivered], bool | None] | None = None
    ) -> Call:
        """Queue a request; fails fast with ShardUnavailable(sent=False) if not connected.

        `fields` are read into the request's frame, not kept. `first`: the call's
        `first` (see `Call`). (`ShardPool.send_routed` queues a request whose head is
        packed already.)
        """
        protocol, writer = self._protocol, self._writer
        if protocol is None or writer is None:
            raise ShardUnavailable(self.shard_id, "not connected", sent=False)
        call = self._new_call(first)
        # A RequestFields-shaped dict: the ignore is a `cast` without its call
        given: wire.RequestFields = fields  # type: ignore[assignment]
        if type(given) is not dict:
            given = dict(fields)  # type: ignore[assignment]
        frame = protocol.request(op, given, call, self._rings.version)
        try:
            # WireError if too big. A large body stays its own piece, never copied.
            parts = wire.encode_parts(frame)
        except BaseException:
            protocol.abandon(call)
            raise
        if not writer.try_queue(parts, call):
            protocol.abandon(call)
            raise ShardUnavailable(self.shard_id, "too many requests queued", sent=False)
        return call

    def _new_call(self, first: Callable[[Delivered], bool | None] | None) -> Call:
        """A call on this connection, every field set (see `Call`)."""
        call: Call = Call()
        call.answered = call.sent = call.done = False
        call.buffered = 0
        call._conn = self
        call._inbox = None
        call._waiter = call.sink = call.early = None
        call.first = first
        return call

    def _abandon(self, call: Call) -> None:
        """The caller left before the response completed: tell the shard to stop."""
        protocol, writer = self._protocol, self._writer
        if protocol is None or writer is None or call._conn is not self:
            return
        if protocol.pending.get(call.id) is not call:
            return  # complete, or a call of an earlier connection
        protocol.abandon(call)
        self._check_drained()
        if call.sent:
            writer.send_nowait(rpc_core.cancel(call.id))
        else:  # still queued: just do not send it
            writer.discard(call)

    # -- connection lifecycle -------------------------------------------------------

    async def run(self, on_ring: RingSink) -> None:
        """Connect, authenticate, serve, reconnect; forever (until cancelled)."""
        backoff = BACKOFF_MIN
        while True:
            try:
                stream = await self._connect()
            except OSError as exc:
                self._set_problem("disconnected", f"connect failed: {exc}")
            else:
                try:
                    reader, protocol = await self._handshake(stream)
                    backoff = BACKOFF_MIN
                    if protocol.peer_ring is not None:
                        on_ring(protocol.peer_ring, self.shard_id)
                    await self._serve(stream, reader, protocol, on_ring)
                    self._set_problem("disconnected", "connection lost")
                except AuthError as exc:
                    self._set_problem(exc.reason, str(exc))
                    backoff = BACKOFF_MAX  # an impostor or a misconfiguration: no hurry
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._set_problem("disconnected", f"handshake failed: {exc}")
                except trio.TooSlowError:
                    self._set_problem("no handshake", f"within {self._hello_timeout}s")
                except wire.WireError as exc:
                    self._set_problem("protocol error", str(exc))
                except Exception as exc:  # whatever a shard sends, the caller lives on
                    log.exception("shard %s: unexpected error on its connection", self.shard_id)
                    self._set_problem("protocol error", repr(exc))
                finally:
                    self._lost()
                    await trio.aclose_forcefully(stream)  # a TLS goodbye could block
            self.tried = True
            await trio.sleep(jittered(backoff))
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _set_problem(self, reason: str, detail: str) -> None:
        """Remember why the shard is not usable; log when the reason changes."""
        if reason != self.problem:
            level = logging.INFO if reason == "disconnected" else logging.ERROR
            log.log(
                level, "shard %s at %s:%s: %s (%s)", self.shard_id, *self.address, reason, detail
            )
        self.problem = reason

    async def _connect(self) -> trio.abc.Stream:
        tcp = await trio.open_tcp_stream(*self.address)
        if self._ssl_context is None:
            return tcp
        return trio.SSLStream(tcp, self._ssl_context, server_hostname=self.address[0])

    async def _handshake(
        self, stream: trio.abc.Stream
    ) -> tuple[FrameReader, rpc_core.CallerProtocol[Call]]:
        """Authenticate both ways (TLS first, when configured). Raises AuthError,
        WireError or TooSlowError."""
        ring = self._rings.current.to_wire()
        handshake = ClientHandshake(
            self._secret, role=self._role, name=self._name, shard_id=self.shard_id, ring=ring
        )
        protocol = rpc_core.CallerProtocol[Call](handshake)
        reader = FrameReader(stream)
        with trio.fail_after(self._hello_timeout):
            if isinstance(stream, trio.SSLStream):
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise AuthError("TLS handshake failed", str(exc.__cause__ or exc)) from None
            await stream.send_all(wire.encode(protocol.hello()))
            refused = "disconnected"
            while not protocol.ready:
                frame = await reader.next_frame()
                if frame is None:
                    raise AuthError(refused, "the shard closed the connection")
                reply = protocol.on_handshake(frame)
                if reply is not None:
                    await stream.send_all(wire.encode(reply))
                    refused = "authentication failed"
        self.health = protocol.health
        return reader, protocol

    async def _serve(
        self,
        stream: trio.abc.Stream,
        reader: FrameReader,
        protocol: rpc_core.CallerProtocol[Call],
        on_ring: RingSink,
    ) -> None:
        """Run reader and writer until either ends; the connection is then lost."""
        early = reader.authenticated()
        async with trio.open_nursery() as nursery:
            writer = FrameWriter(stream, nursery.cancel_scope, MAX_QUEUED)
            self._writer = writer
            self._protocol = protocol
            self.problem = ""
            self.connected_event.set()
            log.info("shard %s: connected to %s:%s", self.shard_id, *self.address)
            nursery.start_soon(writer.run)
            if self._heartbeat is not None:
                nursery.start_soon(self._pinger, *self._heartbeat, nursery.cancel_scope)
            await self._reader(reader, protocol, early, on_ring)
            nursery.cancel_scope.cancel()

    async def _pinger(self, interval: float, timeout: float, scope: trio.CancelScope) -> None:
        """Drop the connection when the shard stops answering (hung, stopped, or the link
        blackholed): TCP alone would keep it open and every call on it would wait forever."""
        while True:
            await trio.sleep(interval)
            answered = False
            async with self.open("ping", {"a": {}}) as call:
                # The second, short wait is a grace for our own event loop: after a stall
                # (thousands of clients leaving at once) the timer fires before the reader
                # has run, though the answer is already in the socket.
                for wait in (timeout, PING_GRACE):
                    with trio.move_on_after(wait):
                        try:
                            res = await call.response()
                            self._take_health(res.get("a", {}).get("health"))
                        except ShardError:
                            pass  # an answer all the same (a shard that does not know "ping")
                        except ShardUnavailable:
                            return  # the connection is already gone
                        answered = True
                    if answered:
                        break
            if not answered:
                log.warning(
                    "shard %s: no answer to a ping within %ss; dropping the connection",
                    self.shard_id,
                    timeout,
                )
                scope.cancel()
                return

    def _take_health(self, health: object) -> None:
        if type(health) is dict and all(
            type(k) is str and type(v) is str for k, v in health.items()
        ):
            self.health = health

    def _lost(self) -> None:
        """Fail every call in flight and every queued frame; new calls fail fast."""
        protocol, self._protocol = self._protocol, None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()
        if protocol is None:
            return
        self.connected_event = trio.Event()
        for call in protocol.lost():
            call._put(_DROPPED)
        self._check_drained()

    async def _reader(
        self,
        reader: FrameReader,
        protocol: rpc_core.CallerProtocol[Call],
        frames: list[wire.Frame],
        on_ring: RingSink,
    ) -> None:
        """Dispatch frames to their calls; returns when the connection ends."""
        on_frame = protocol.on_frame
        pending = protocol.pending
        try:
            while True:
                for frame in frames:
                    if frame["k"] == "res" and not frame["more"]:
                        # A whole answer, the most frequent frame (every append's):
                        # `on_frame` written out, then the call's `_put`.
                        call = pending.pop(frame["i"], None)
                        if call is None:
                            continue  # a call we abandoned, or a stray id
                        if call.answered:  # (pending again, to be failed with the rest)
                            pending[call.id] = call
                            raise rpc_core.ProtocolError("a second response to one request")
                        call.answered = True
                        call._put(frame)
                        continue
                    call = on_frame(frame)
                    if frame["k"] == "err" and "a" in frame:
                        ring = frame["a"].get("ring")
                        if ring is not None:
                            on_ring(ring, self.shard_id)
                    if call is None:
                        continue  # a call we abandoned, or a stray id
                    if frame["k"] == "chunk" and frame["more"]:
                        sink = call.sink
                        if sink is not None:
                            _hand(sink, frame["b"])
                            continue
                        call.buffered += len(frame["b"])
                        if call.buffered > self._max_buffered:
                            self._overflow(protocol, call)
                            continue
                    call._put(frame)
                if self._drained is not None:
                    self._check_drained()
                received = await reader.frames()
                if received is None:
                    log.info("shard %s: connection closed by the shard", self.shard_id)
                    return
                frames = received
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("shard %s: connection lost (read): %s", self.shard_id, exc)
        except wire.WireError as exc:
            log.warning("shard %s: protocol error: %s", self.shard_id, exc)

    def _overflow(self, protocol: rpc_core.CallerProtocol[Call], call: Call) -> None:
        """A streaming call's consumer fell too far behind: cancel it on the shard."""
        protocol.abandon(call)
        if self._writer is not None:
            self._writer.send_nowait(rpc_core.cancel(call.id))
        call._put(_OVERFLOW)


def _hand(sink: Callable[[_T], None], item: _T) -> None:
    """A chunk to a relaying call's sink (`Call.relay`), or a response to a call's
    `early`: a bug there must end neither the relay nor, from the connection's reader,
    every other call."""
    try:
        sink(item)
    except Exception:
        log.exception("a call's sink failed")


class ShardPool:
    """Connections to every shard of the newest ring, owned by this async context manager.

    `endpoints` are the addresses known at start (merged with the ring's own); `ring`
    the ring to start from. `drop_departed`: close the connection of a shard once a
    newer ring leaves it out (a gateway); False keeps it (a shard, which may still have
    streams to hand over to it)."""

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        ring: Ring,
        *,
        role: str,
        name: str,
        secret: bytes,
        ssl_context: ssl.SSLContext | None = None,
        max_buffered: int = MAX_BUFFERED,
        heartbeat: tuple[float, float] | None = (HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT),
        drop_departed: bool = True,
    ) -> None:
        self._addresses: dict[str, Endpoint] = {**ring.endpoints, **endpoints}
        self.rings = RingHolder(ring)
        self._role = role
        self._name = name
        self._secret = secret
        self._ssl_context = ssl_context
        self._max_buffered = max_buffered
        self._heartbeat = heartbeat
        self._drop_departed = drop_departed
        self.connections: dict[str, ShardConnection] = {}
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: AbstractAsyncContextManager[trio.Nursery] | None = None
        for shard_id, address in self._addresses.items():  # the ring's, and any given
            self._add(shard_id, address)

    @property
    def ring(self) -> Ring:
        """The newest ring seen."""
        return self.rings.current

    async def __aenter__(self) -> ShardPool:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        self._nursery = nursery
        for conn in self.connections.values():
            self._start(conn)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        # The body's own exception is not handed to the nursery, so it propagates as it is
        # rather than wrapped in an ExceptionGroup; a crashed connection task still raises.
        assert self._nursery is not None and self._nursery_cm is not None
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)
        return None

    # -- the ring ------------------------------------------------------------------

    def adopt(self, ring: Ring) -> bool:
        """Take `ring` if newer than ours (True): connect to its new shards, and close
        the connections of shards it leaves out (with `drop_departed`)."""
        known = {sid: ep for sid, ep in self._addresses.items() if sid in ring.shard_ids}
        ring = ring.with_endpoints({**known, **ring.endpoints})
        if not self.rings.adopt(ring):
            return False
        self._addresses.update(ring.endpoints)
        log.info("ring v%d adopted: %s", ring.version, ",".join(ring.shard_ids))
        for shard_id in ring.shard_ids:
            address = ring.endpoints.get(shard_id)
            if address is not None:
                self._add(shard_id, address)
        if self._drop_departed:
            for shard_id in [sid for sid in self.connections if sid not in ring.shard_ids]:
                log.info("shard %s left the ring: closing its connection", shard_id)
                self._retire(self.connections.pop(shard_id))
        return True

    def _retire(self, conn: ShardConnection) -> None:
        """Close `conn` once the calls in flight on it are answered (within DEPART_GRACE):
        a shard that left the ring still answers what it was asked before."""
        if self._nursery is None:
            conn.scope.cancel()
            return

        async def retire() -> None:
            with trio.move_on_after(DEPART_GRACE):
                await conn.drained()
            conn.scope.cancel()

        self._nursery.start_soon(retire, name=f"shard-retire-{conn.shard_id}")

    def _heard(self, info: object, shard_id: str) -> None:
        """A shard sent its ring (ready, err): adopt it if newer and well-formed."""
        if type(info) is dict and info.get("version", -1) <= self.rings.version:
            return  # the common case: nothing newer (checked without building a Ring)
        try:
            ring = Ring.from_wire(info)
        except ValueError as exc:
            log.warning("shard %s sent a malformed ring: %s", shard_id, exc)
            return
        self.adopt(ring)

    def _add(self, shard_id: str, address: Endpoint) -> None:
        """A connection to `shard_id` at `address` (replacing one to another address)."""
        if self._role == "shard" and shard_id == self._name:
            return  # a shard does not call itself
        old = self.connections.get(shard_id)
        if old is not None:
            if old.address == address:
                return
            self._retire(old)  # the shard moved: new calls go to its new address
        conn = ShardConnection(
            shard_id,
            address,
            role=self._role,
            name=self._name,
            rings=self.rings,
            secret=self._secret,
            ssl_context=self._ssl_context,
            max_buffered=self._max_buffered,
            heartbeat=self._heartbeat,
        )
        self.connections[shard_id] = conn
        if self._nursery is not None:
            self._start(conn)

    def _start(self, conn: ShardConnection) -> None:
        assert self._nursery is not None

        async def run() -> None:
            with conn.scope:
                await conn.run(self._heard)

        self._nursery.start_soon(run, name=f"shard-conn-{conn.shard_id}")

    # -- state -----------------------------------------------------------------------

    def connected(self, shard_id: str) -> bool:
        conn = self.connections.get(shard_id)
        return conn is not None and conn.connected

    def all_connected(self) -> bool:
        return all(conn.connected for conn in self.connections.values())

    def disconnected(self) -> list[str]:
        return [sid for sid, conn in self.connections.items() if not conn.connected]

    def problems(self) -> dict[str, str]:
        """Shards of the ring that cannot serve now, with the reason: not connected (and
        why: e.g. "authentication failed"), no address known, or connected but reporting
        failed storage."""
        out: dict[str, str] = {}
        for sid in self.ring.shard_ids:
            if self._role == "shard" and sid == self._name:
                continue
            conn = self.connections.get(sid)
            if conn is None:
                out[sid] = "no address known"
            elif not conn.connected:
                out[sid] = conn.problem or "disconnected"
            elif (storage := conn.health.get("storage", "ok")) != "ok":
                out[sid] = f"storage {storage}"
        return out

    async def wait_connected(self, shard_id: str | None = None) -> None:
        """Wait until one shard (or, with None, every shard) is connected."""
        conns = self.connections.values() if shard_id is None else [self.connections[shard_id]]
        for conn in list(conns):
            while not conn.connected:
                await conn.connected_event.wait()

    # -- calls -----------------------------------------------------------------------

    def open(self, shard_id: str, op: str, fields: Fields) -> Call:
        """Send a request now (fail-fast); use the result as an async context manager."""
        try:
            conn = self.connections[shard_id]
        except KeyError:
            raise ShardUnavailable(shard_id, "unknown shard", sent=False) from None
        return conn.open(op, fields)

    async def call(
        self, shard_id: str, op: str, args: Mapping[str, object], timeout: float
    ) -> wire.Args:
        """A simple op: send `a`=args, return the result map `a` of the `res`.

        Raises ShardUnavailable (ShardTimeout after `timeout` seconds) or ShardError.
        """
        async with self.open(shard_id, op, {"a": dict(args)}) as call:
            with trio.move_on_after(timeout) as scope:
                res = await call.response()
            if scope.cancelled_caught:
                raise ShardTimeout(shard_id, f"no answer within {timeout}s", sent=call.sent)
            return res.get("a", {})

    async def call_routed(
        self, key: str, op: str, args: Mapping[str, object], timeout: float
    ) -> wire.Args:
        """`call` on the owner of `key` under the newest ring, a ring change or a move on
        the way retried as by `open_routed`."""
        call: Call | None = None
        with trio.move_on_after(timeout):
            call = await self.open_routed(key, op, {"a": dict(args)})
            async with call:
                return (await call.response()).get("a", {})
        sent = call is not None and call.sent
        raise ShardTimeout(self.ring.owner(key), f"no answer within {timeout}s", sent=sent)

    async def open_routed(
        self,
        path: str,
        op: str,
        fields: Fields,
        deadline: float = ROUTE_DEADLINE,
        early: Callable[[wire.ResponseFrame], None] | None = None,
        sent: tuple[Ring, Call] | None = None,
    ) -> Call:
        """`open` on the owner of `path` under the newest ring, once the shard has taken
        the request: a ring change or a move on the way is retried (see the module's
        docstring) until `deadline` seconds after the first such answer; the call is
        returned with its first frame unread (`response()` raises ShardError with the
        last answer if none was taken in time). Raises ShardUnavailable as `open`.
        `early` is given a complete `res` by the connection's reader as it arrives, a
        scheduler pass before the caller's task has it (must not block; what it raises
        is logged). `sent`: the ring and call of a request `send_routed` sent already,
        taken as this loop's first attempt."""
        give_up: float | None = None
        backoff = ROUTE_BACKOFF
        pushed: set[str] = set()  # shards sent our ring already
        while True:
            if sent is not None:
                (ring, call), sent = sent, None
                shard_id = call.shard_id
                call.first = None
            else:
                ring = self.rings.current
                shard_id = ring.owner(path)
                conn = self.connections.get(shard_id)
                if conn is None:
                    raise ShardUnavailable(shard_id, "unknown shard", sent=False)
                if not conn.connected and not conn.tried:
                    # A shard we just heard of: its first connection is under way.
                    with trio.move_on_after(deadline):
                        await conn.connected_event.wait()
                call = conn.open(op, fields)
            call.early = early
            # The first item, left in the inbox for the caller; waited for here rather
            # than in a coroutine of the call's: every level of coroutine a task waits
            # under is stepped through again when it is woken, once per request.
            inbox = call._inbox
            if not inbox:
                call._waiter = _current_task()
                try:
                    await _wait_task_rescheduled(call._abort_wait)
                except BaseException:
                    call.close()
                    raise
                inbox = call._inbox  # (`_put` woke it: one was made)
                assert inbox is not None
            first = inbox[0]
            if isinstance(first, _Stop) or first["k"] != "err":
                return call
            code = first["code"]
            if code not in ("version", "misdirected", "moving"):
                return call
            now = trio.current_time()
            give_up = now + deadline if give_up is None else give_up
            if now >= give_up:
                return call
            theirs = first.get("a", {}).get("ring")
            wait = jittered(backoff)
            if code == "moving":
                wait = min(max(retry_after(first.get("a", {})), wait), MAX_RETRY_AFTER)
            elif (
                type(theirs) is dict
                and theirs.get("version", 0) < self.rings.version
                and shard_id not in pushed
            ):
                # The shard is behind: bring it up to our ring, then ask again at once
                # (once per shard: if it stays behind, the backoff paces the retries).
                pushed.add(shard_id)
                await self._push_ring(shard_id, give_up - now)
                wait = 0.0
            elif self.rings.version > ring.version:
                wait = 0.0  # its answer taught us a newer ring: route again at once
            backoff = min(backoff * 2, MAX_RETRY_AFTER)
            if wait:
                await trio.sleep(min(wait, max(give_up - trio.current_time(), 0.0)))

    def send_routed(
        self,
        path: str,
        op: str,
        fields: Fields,
        first: Callable[[Delivered], bool | None],
        head: bytes | None = None,
        body: bytes = b"",
    ) -> tuple[Ring, Call] | None:
        """Send a request to the owner of `path` under the newest ring now, without waiting
        for its answer: `first` is given the first item delivered (by the connection's
        reader), and `open_routed(..., sent=...)` with the ring and call returned takes
        it from there when that was not the answer (a ring change to retry, a failure).
        None when it cannot be sent at once (no connection to the owner, or too much
        queued for it): `open_routed` then does what it does with such a request.
        `head`: for an http request, its m, p, q and h packed already
        (`wire.pack_http_head` of `fields`'): only the call id, ring version and `body`
        are packed here (`fields` is not read, so a caller need not build a dict of this
        request's own)."""
        ring = self.rings.current
        conn = self.connections.get(ring.owners.get(path) or ring.owner(path))
        if conn is None:
            return None
        protocol, writer = conn._protocol, conn._writer
        if protocol is None or writer is None:
            return None
        if head is None:
            try:
                return ring, conn.open(op, fields, first)
            except ShardUnavailable:
                return None
        # `conn.open` of a packed head, here rather than in a call of its own (700
        # instructions, and every plain append comes this way), with
        # `CallerProtocol.request` written out (without the frame it builds).
        call = conn._new_call(first)
        call.id = call_id = protocol.last_id = protocol.last_id + 1
        protocol.pending[call_id] = call
        try:
            parts = wire.encode_http_request(call_id, conn._rings.version, head, body)
        except BaseException:  # WireError if too big
            protocol.abandon(call)
            raise
        if not writer.try_queue(parts, call):
            protocol.abandon(call)
            return None
        return ring, call

    async def _push_ring(self, shard_id: str, timeout: float) -> None:
        """Send our ring to a shard on an older one (`ring_set`); failures only log (the
        retry that follows reports them)."""
        try:
            result = await self.call(
                shard_id, "ring_set", {"ring": self.ring.to_wire()}, timeout=max(timeout, 0.1)
            )
        except (ShardUnavailable, ShardError) as exc:
            log.warning(
                "shard %s: could not bring it to ring v%d: %s", shard_id, self.rings.version, exc
            )
            return
        self._heard(result.get("ring"), shard_id)
