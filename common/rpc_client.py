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

Each connection runs three kinds of task in the pool's nursery: a supervisor that
connects (exponential backoff, 50 ms doubling to 0.5 s, jittered; optionally TLS) and
runs the mutual authentication of common/cluster_auth.py; one reader that dispatches
frames by request id into per-call inboxes; one writer that joins every queued small frame
into a single send_all (a large body is sent as it is). A shard that fails authentication,
claims another id or is on another ring version is not used; `ShardPool.problems()` says
why, for readiness.

Failure model, so callers never hang and never guess:
  * shard not connected: `open`/`call` raise ShardUnavailable(sent=False) at once;
  * connection drops: every call in flight on it fails at once with ShardUnavailable;
    `sent` says whether its request frame was handed to the socket (True: the outcome is
    unknown, the shard may have acted; False: it certainly did not);
  * the shard answers `err`: ShardError(code, msg);
  * leaving `open(...)` before the response is complete sends `cancel` to the shard.
  * the shard stops answering (hung, SIGSTOPped, link blackholed): a `ping` op every
    HEARTBEAT_INTERVAL s unanswered for HEARTBEAT_TIMEOUT s drops the connection, which
    fails the calls on it as above;
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
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import trio

from ds_cluster.common import wire
from ds_cluster.common.backoff import jittered
from ds_cluster.common.cluster_auth import AuthError, ClientHandshake
from ds_cluster.common.ring import Ring

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.05
BACKOFF_MAX = 0.5  # a restarted shard is reconnected within half a second of listening
HELLO_TIMEOUT = 5.0
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 8.0  # a busy shard (thousands of cancels at once) is not a hung one
RECV_SIZE = 256 * 1024
PING_GRACE = 1.0  # extra wait for a ping answer after our own loop may have stalled
MAX_BUFFERED = 16 * 1024 * 1024
FRAME_STALL = 10.0  # seconds a started frame may go without a byte
FRAME_GRACE = 10.0  # seconds any frame gets, plus its size at MIN_FRAME_RATE
MIN_FRAME_RATE = 1024 * 1024  # bytes/s


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
    """The shard answered the request with an `err` frame."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


# Sentinels the reader puts into a call's channel when the call cannot continue.
_DROPPED = object()
_OVERFLOW = object()


class Call:
    """One request in flight. Created by ShardPool.open / ShardConnection.open."""

    __slots__ = (
        "_conn",
        "_gen",
        "id",
        "_inbox",
        "_waiter",
        "sent",
        "done",
        "buffered",
        "answered",
    )

    def __init__(self, conn: ShardConnection, call_id: int) -> None:
        self._conn = conn
        self._gen = conn._generation
        self.id = call_id
        # The frames the connection's reader delivered and the task parked for the next one:
        # a deque and a task instead of a memory channel, made for every request.
        self._inbox: deque[Any] = deque()
        self._waiter: trio.lowlevel.Task | None = None
        self.sent = False  # the writer handed our frame to the socket
        self.done = False  # the final frame (or an error) has been received
        self.buffered = 0  # bytes of chunk bodies delivered but not yet consumed
        self.answered = False  # its `res` has arrived (a second one is a protocol error)

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.done:
            self.done = True
            self._conn._abandon(self)

    def _put(self, item: object) -> None:
        """Deliver a frame (or a sentinel); called by the connection, never blocks."""
        self._inbox.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    async def _next(self) -> Any:
        """The next delivered item, waiting for it if none is there yet."""
        if not self._inbox:
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
        return self._inbox.popleft()

    def _abort_wait(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _unavailable(self, item: object) -> ShardUnavailable:
        self.done = True
        if item is _OVERFLOW:
            return ShardUnavailable(self._conn.shard_id, "consumer too slow", sent=True)
        reason = "connection lost" if self.sent else "connection lost before sending"
        return ShardUnavailable(self._conn.shard_id, reason, sent=self.sent)

    async def response(self) -> wire.ResponseFrame:
        """The `res` frame (s, h, b, more; or `a` for non-http ops). Cancel-safe."""
        msg = await self._next()
        if type(msg) is not dict:
            raise self._unavailable(msg)
        kind = msg["k"]
        if kind == "res":
            if not msg["more"]:
                self.done = True
            return msg  # type: ignore[return-value]  # a `res`, checked by wire.parse
        self.done = True
        if kind == "err":
            raise ShardError(msg["code"], msg["msg"])
        raise ShardError("internal", f"unexpected {kind!r} frame before the response")

    async def chunks(self) -> AsyncIterator[bytes]:
        """Bodies of the `chunk` frames that follow a `res` with more=True."""
        while not self.done:
            msg = await self._next()
            if type(msg) is not dict:
                raise self._unavailable(msg)
            if msg["k"] == "err":
                self.done = True
                raise ShardError(msg["code"], msg["msg"])
            body = msg["b"]
            self.buffered -= len(body)
            if not msg["more"]:
                self.done = True
            if body:
                yield body


class ShardConnection:
    """The persistent, multiplexed connection to one shard. Run by a ShardPool."""

    def __init__(
        self,
        shard_id: str,
        address: tuple[str, int],
        *,
        role: str,
        name: str,
        ring: wire.RingInfo,
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
        self._ring = ring
        self._secret = secret
        self._ssl_context = ssl_context
        self._ring_version = ring["version"]
        self._max_buffered = max_buffered
        self._generation = 0  # bumped on each (dis)connection; stale calls are ignored
        self._connected = False
        self._next_id = 0
        self._pending: dict[int, Call] = {}
        self._outbox: list[tuple[bytes, Call | None]] = []
        self._wake = trio.Event()
        self.problem = "not connected yet"  # why not connected (for readiness)
        self.health: dict[str, str] = {}  # the shard's last health report (ready, pings)
        self.connected_event = trio.Event()  # set while connected; replaced when lost

    @property
    def connected(self) -> bool:
        return self._connected

    # -- calls -----------------------------------------------------------------------

    def open(self, op: str, fields: Mapping[str, Any]) -> Call:
        """Queue a request; fails fast with ShardUnavailable(sent=False) if not connected.

        A dict `fields` becomes the frame itself (k, i, op, r are set in it): pass a fresh one.
        """
        if not self._connected:
            raise ShardUnavailable(self.shard_id, "not connected", sent=False)
        self._next_id += 1
        call_id = self._next_id
        message = fields if type(fields) is dict else dict(fields)
        message["k"] = "req"
        message["i"] = call_id
        message["op"] = op
        message["r"] = self._ring_version
        # raises WireError if too big: nothing registered yet. A large body stays its own
        # piece, never copied behind its head.
        parts = wire.encode_parts(message)
        call = Call(self, call_id)
        self._pending[call_id] = call
        if len(parts) == 1:
            self._outbox.append((parts[0], call))
        else:
            self._outbox.extend((part, call) for part in parts)
        self._wake.set()
        return call

    def _abandon(self, call: Call) -> None:
        """The caller left before the response completed: tell the shard to stop."""
        if self._pending.pop(call.id, None) is None or call._gen != self._generation:
            return
        if call.sent:
            self._outbox.append((wire.encode({"k": "cancel", "i": call.id}), None))
            self._wake.set()
        else:  # still queued: just do not send it
            self._outbox = [item for item in self._outbox if item[1] is not call]

    # -- connection lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Connect, authenticate, serve, reconnect; forever (until cancelled by the pool)."""
        backoff = BACKOFF_MIN
        while True:
            try:
                stream = await self._connect()
            except OSError as exc:
                self._set_problem("disconnected", f"connect failed: {exc}")
            else:
                try:
                    start = await self._handshake(stream)
                    backoff = BACKOFF_MIN
                    await self._serve(stream, *start)
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
    ) -> tuple[wire.FrameDecoder, list[wire.Frame]]:
        """Authenticate both ways (TLS first, when configured); returns the decoder and any
        frames that came after `ready`. Raises AuthError, WireError or TooSlowError."""
        handshake = ClientHandshake(
            self._secret,
            role=self._role,
            name=self._name,
            shard_id=self.shard_id,
            ring=self._ring,
        )
        decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME)
        frames: deque[wire.Frame] = deque()

        async def next_frame(refused: str) -> wire.Frame:
            while not frames:
                data = await stream.receive_some(RECV_SIZE)
                if not data:
                    raise AuthError(refused, "the shard closed the connection")
                frames.extend(decoder.feed(data))
            return frames.popleft()

        with trio.fail_after(self._hello_timeout):
            if isinstance(stream, trio.SSLStream):
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise AuthError("TLS handshake failed", str(exc.__cause__ or exc)) from None
            await stream.send_all(wire.encode(handshake.hello()))
            auth = handshake.on_server_hello(await next_frame("disconnected"))
            await stream.send_all(wire.encode(auth))
            self.health = handshake.on_ready(await next_frame("authentication failed"))
        peer_ring = handshake.peer_ring
        assert peer_ring is not None
        if peer_ring["version"] != self._ring_version:
            raise AuthError(
                f"ring version {peer_ring['version']}, expected {self._ring_version}",
                "not routing to a shard on another ring",
            )
        decoder.max_frame = wire.MAX_FRAME_BYTES
        return decoder, list(frames)

    async def _serve(
        self, stream: trio.abc.Stream, decoder: wire.FrameDecoder, early: list[wire.Frame]
    ) -> None:
        """Run reader and writer until either ends; the connection is then lost."""
        self._generation += 1
        self._connected = True
        self.problem = ""
        self.connected_event.set()
        log.info("shard %s: connected to %s:%s", self.shard_id, *self.address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, stream, nursery.cancel_scope)
            if self._heartbeat is not None:
                nursery.start_soon(self._pinger, *self._heartbeat, nursery.cancel_scope)
            await self._reader(stream, decoder, early)
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
        was_connected = self._connected
        self._connected = False
        self._generation += 1
        if was_connected:
            self.connected_event = trio.Event()
        pending, self._pending = self._pending, {}
        self._outbox = []
        for call in pending.values():
            call._put(_DROPPED)

    async def _writer(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        try:
            while True:
                if not self._outbox:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                batch, self._outbox = self._outbox, []
                for _, call in batch:
                    if call is not None:
                        call.sent = True
                for data in wire.coalesce([frame for frame, _ in batch]):
                    await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("shard %s: connection lost (write): %s", self.shard_id, exc)
            scope.cancel()

    async def _reader(
        self, stream: trio.abc.Stream, decoder: wire.FrameDecoder, messages: list[wire.Frame]
    ) -> None:
        """Dispatch frames to their calls; returns when the connection ends."""
        pending = self._pending
        try:
            while True:
                for msg in messages:
                    kind = msg["k"]
                    if kind != "res" and kind != "chunk" and kind != "err":
                        raise wire.WireError(f"unexpected {kind!r} frame from a shard")
                    call = pending.get(msg["i"])
                    if call is None:
                        continue  # a call we abandoned, or a stray id
                    if kind == "chunk":
                        if not call.answered:
                            raise wire.WireError("a chunk before its response")
                        if msg["more"]:
                            call.buffered += len(msg["b"])
                            if call.buffered > self._max_buffered:
                                self._overflow(call)
                                continue
                        else:
                            del pending[call.id]
                    elif kind == "res":
                        if call.answered:
                            raise wire.WireError("a second response to one request")
                        call.answered = True
                        if not msg["more"]:
                            del pending[call.id]
                    else:
                        del pending[call.id]
                    call._put(msg)
                if decoder.partial:
                    # A frame the shard started must keep coming (it cannot hold us and
                    # the bytes it sent so far forever), as on the shard's side.
                    if decoder.frame_started is None:
                        decoder.frame_started = trio.current_time()
                    need = decoder.expected or 4
                    deadline = decoder.frame_started + FRAME_GRACE + need / MIN_FRAME_RATE
                    data: wire.Received = b""
                    with trio.move_on_at(min(deadline, trio.current_time() + FRAME_STALL)):
                        data = await stream.receive_some(RECV_SIZE)
                    if not data and decoder.partial:
                        log.warning("shard %s: a frame stalled or was cut off", self.shard_id)
                        return
                else:
                    data = await stream.receive_some(RECV_SIZE)
                if not data:
                    log.info("shard %s: connection closed by the shard", self.shard_id)
                    return
                # A large reply is joined off the loop (wire.complete).
                messages = await wire.complete(decoder.feed_deferred(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("shard %s: connection lost (read): %s", self.shard_id, exc)
        except wire.WireError as exc:
            log.warning("shard %s: protocol error: %s", self.shard_id, exc)

    def _overflow(self, call: Call) -> None:
        """A streaming call's consumer fell too far behind: cancel it on the shard."""
        del self._pending[call.id]
        self._outbox.append((wire.encode({"k": "cancel", "i": call.id}), None))
        self._wake.set()
        call._put(_OVERFLOW)


class ShardPool:
    """Connections to every shard in `endpoints`, owned by this async context manager."""

    def __init__(
        self,
        endpoints: Mapping[str, tuple[str, int]],
        ring: Ring,
        *,
        role: str,
        name: str,
        secret: bytes,
        ssl_context: ssl.SSLContext | None = None,
        max_buffered: int = MAX_BUFFERED,
        heartbeat: tuple[float, float] | None = (HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT),
    ) -> None:
        self.ring = ring
        ring_info = ring.to_wire()
        self.connections = {
            shard_id: ShardConnection(
                shard_id,
                address,
                role=role,
                name=name,
                ring=ring_info,
                secret=secret,
                ssl_context=ssl_context,
                max_buffered=max_buffered,
                heartbeat=heartbeat,
            )
            for shard_id, address in endpoints.items()
        }
        self._nursery_cm: Any = None

    async def __aenter__(self) -> ShardPool:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        for conn in self.connections.values():
            nursery.start_soon(conn.run, name=f"shard-conn-{conn.shard_id}")
        self._nursery = nursery
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        # The body's own exception is not handed to the nursery, so it propagates as it is
        # rather than wrapped in an ExceptionGroup; a crashed connection task still raises.
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)
        return None

    def connected(self, shard_id: str) -> bool:
        return self.connections[shard_id].connected

    def all_connected(self) -> bool:
        return all(conn.connected for conn in self.connections.values())

    def disconnected(self) -> list[str]:
        return [sid for sid, conn in self.connections.items() if not conn.connected]

    def problems(self) -> dict[str, str]:
        """Shards that cannot serve now, with the reason: not connected (and why: e.g.
        "authentication failed"), or connected but reporting failed storage."""
        out: dict[str, str] = {}
        for sid, conn in self.connections.items():
            if not conn.connected:
                out[sid] = conn.problem or "disconnected"
                continue
            storage = conn.health.get("storage", "ok")
            if storage != "ok":
                out[sid] = f"storage {storage}"
        return out

    async def wait_connected(self, shard_id: str | None = None) -> None:
        """Wait until one shard (or, with None, every shard) is connected."""
        conns = self.connections.values() if shard_id is None else [self.connections[shard_id]]
        for conn in conns:
            while not conn.connected:
                await conn.connected_event.wait()

    def open(self, shard_id: str, op: str, fields: Mapping[str, Any]) -> Call:
        """Send a request now (fail-fast); use the result as an async context manager."""
        try:
            conn = self.connections[shard_id]
        except KeyError:
            raise ShardUnavailable(shard_id, "unknown shard", sent=False) from None
        return conn.open(op, fields)

    async def call(
        self, shard_id: str, op: str, args: Mapping[str, Any], timeout: float
    ) -> dict[str, Any]:
        """A simple op: send `a`=args, return the result map `a` of the `res`.

        Raises ShardUnavailable (ShardTimeout after `timeout` seconds) or ShardError.
        """
        async with self.open(shard_id, op, {"a": dict(args)}) as call:
            with trio.move_on_after(timeout) as scope:
                res = await call.response()
            if scope.cancelled_caught:
                raise ShardTimeout(shard_id, f"no answer within {timeout}s", sent=call.sent)
            return res.get("a", {})
