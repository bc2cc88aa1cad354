"""The shard's msgpack RPC server: accepts gateway and peer-shard connections.

A connection first authenticates (common/cluster_auth.py: both sides prove the cluster
secret; optionally under TLS) within HELLO_TIMEOUT, with frames of at most
wire.MAX_HANDSHAKE_FRAME bytes; until then it is served nothing. Then a reader decodes
frames (checked by `wire.parse`), answers `ping` inline, starts one task per request in
the connection's nursery and routes `cancel`; a coalescing writer sends replies.

Every frame is untrusted, and a connection costs bounded memory and time:
  * a frame of the wrong shape, or a protocol breach, closes that connection only (its
    requests are cancelled), with one log line; never the process;
  * a request whose ring version is not ours gets `err version` (with our ring) unrun;
  * replies queued and not yet sent are capped (REPLY_BUDGET per connection,
    PROCESS_REPLY_BUDGET in all): a peer that does not read them is dropped; http
    answers wait instead, above HIGH_WATER, and a peer that reads nothing for
    WRITE_STALL_TIMEOUT (plus the batch's size at MIN_FRAME_RATE) is dropped;
  * a frame that has started must keep arriving (FRAME_STALL_TIMEOUT without a byte, or
    slower than MIN_FRAME_RATE after FRAME_GRACE, and the connection is dropped);
  * at most MAX_CALLS requests run at once per connection; beyond, `err unavailable`;
  * registry ops (shard/rpc_ops.py) get OP_TIMEOUT seconds.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import trio

from ds_cluster.common import wire
from ds_cluster.common.cluster_auth import AuthError, ServerHandshake
from ds_cluster.common.paths import PathError, check_canonical
from ds_cluster.shard.committer import StorageUnavailable
from ds_cluster.shard.core.model import Request, Response
from ds_cluster.shard.peers import PeerUnavailable
from ds_cluster.shard.rpc_ops import Handler
from ds_cluster.shard.service import ShardService

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024  # buffered bytes before streaming senders wait
REPLY_BUDGET = 32 * 1024 * 1024  # unsent reply bytes a connection may hold, then it is dropped
PROCESS_REPLY_BUDGET = 256 * 1024 * 1024  # the same over all connections
FRAME_OVERHEAD = 128  # bytes a queued frame costs beyond its length (object, list slot)
HELLO_TIMEOUT = 5.0  # seconds a new connection has to authenticate
FRAME_STALL_TIMEOUT = 10.0  # seconds a started frame may go without a byte
WRITE_STALL_TIMEOUT = 15.0  # seconds a write may wait on a peer that does not read
FRAME_GRACE = 10.0  # seconds any frame gets, plus its size at MIN_FRAME_RATE
MIN_FRAME_RATE = 1024 * 1024  # bytes/s
MAX_CALLS = 50_000  # requests in flight per connection (one gateway multiplexes its clients)
OP_TIMEOUT = 30.0  # seconds for a registry op (export_fork, ...)


class _Dropped(Exception):
    """The connection must close (the reason is logged where it is raised)."""


class ReplyBudget:
    """Unsent reply bytes over every connection of the process (PROCESS_REPLY_BUDGET)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class FrameWriter:
    """Queues frames and writes them in coalesced batches from one task.

    Answers that can wait (http responses and bodies: `send`) wait while more than
    HIGH_WATER bytes are unsent. Answers that cannot (`send_nowait`: pings, op results,
    errors) are capped instead: the one that would take this connection's unsent bytes
    past `budget`, or the process's past its shared budget, closes the connection (a
    connection with nothing unsent may always queue one, so a large answer still goes)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: trio.CancelScope,
        shared: ReplyBudget,
        budget: int = REPLY_BUDGET,
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._shared = shared
        self._budget = budget
        self._frames: list[bytes] = []
        self._size = 0  # queued bytes (with FRAME_OVERHEAD each)
        self._writing = 0  # bytes of the batch being written
        self._wake = trio.Event()
        self._drained = trio.Event()
        self.overflowed = False

    def send_nowait(self, message: dict[str, Any]) -> None:
        if self.overflowed:
            return
        parts = wire.encode_parts(message)
        cost = sum(map(len, parts)) + FRAME_OVERHEAD
        held = self._size + self._writing
        if held and (held + cost > self._budget or self._shared.used + cost > self._shared.limit):
            self.overflowed = True
            self._shared.used -= self._size
            self._frames = []
            self._size = 0
            log.warning("dropping connection: peer left over %d reply bytes unread", held)
            self._connection.cancel()
            return
        self._queue(parts, cost)

    async def send(self, message: dict[str, Any]) -> None:
        """Queue a frame, waiting first while the peer is not keeping up."""
        while self._size + self._writing > HIGH_WATER:
            await self._drained.wait()
        if not self.overflowed:
            parts = wire.encode_parts(message)
            self._queue(parts, sum(map(len, parts)) + FRAME_OVERHEAD)

    def _queue(self, parts: list[bytes], cost: int) -> None:
        """Queue one frame's pieces (a large body is one, sent without a copy)."""
        self._frames += parts
        self._size += cost
        self._shared.used += cost
        self._wake.set()

    def release(self) -> None:
        """The connection is over: its unsent bytes no longer count."""
        self._shared.used -= self._size + self._writing
        self._frames = []
        self._size = self._writing = 0

    async def run(self) -> None:
        """Write until cancelled; a broken connection cancels the connection."""
        try:
            while True:
                if not self._frames:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                frames, self._frames = self._frames, []
                self._writing, self._size = self._size, 0
                self._drained.set()
                self._drained = trio.Event()
                for data in wire.coalesce(frames):
                    with trio.move_on_after(
                        WRITE_STALL_TIMEOUT + len(data) / MIN_FRAME_RATE
                    ) as stalled:
                        await self._stream.send_all(data)
                    if stalled.cancelled_caught:
                        log.warning("dropping connection: peer reads no replies")
                        self._connection.cancel()
                        return
                del frames, data
                self._shared.used -= self._writing
                self._writing = 0
                self._drained.set()
                self._drained = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._connection.cancel()


class RpcServer:
    """Serves `http` and `ping` itself; every other op is looked up in `handlers`."""

    def __init__(
        self,
        service: ShardService,
        handlers: Mapping[str, Handler],
        *,
        secret: bytes,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.service = service
        self.handlers = handlers
        self._secret = secret
        self._ssl_context = ssl_context
        self._replies = ReplyBudget(PROCESS_REPLY_BUDGET)
        health = getattr(service, "health", None)
        self._health: Callable[[], dict[str, Any]] | None = health if callable(health) else None

    def health(self) -> dict[str, str]:
        """The service's health map (storage state), as strings for the wire."""
        if self._health is None:
            return {"storage": "ok"}
        try:
            return {str(key): str(value) for key, value in self._health().items()}
        except Exception as exc:  # a failing health check is itself a health report
            return {"storage": f"failed: health check raised {exc!r}"[:200]}

    async def serve(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self._ssl_context is not None:
            stream = trio.SSLStream(tcp, self._ssl_context, server_side=True)
        try:
            decoder = wire.FrameDecoder(wire.MAX_HANDSHAKE_FRAME)
            early = await self._authenticate(stream, decoder)
            if early is None:
                return
            decoder.max_frame = wire.MAX_FRAME_BYTES
            await self._serve(stream, decoder, early)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug must cost this connection, never the process
            log.exception("dropping connection: unexpected error")
        finally:
            await trio.aclose_forcefully(stream)

    async def _authenticate(
        self, stream: trio.abc.Stream, decoder: wire.FrameDecoder
    ) -> list[wire.Frame] | None:
        """Run the handshake; returns frames received after it, or None (dropped)."""
        ring = self.service.ring.to_wire()
        handshake = ServerHandshake(self._secret, shard_id=self.service.shard_id, ring=ring)
        frames: list[wire.Frame] = []
        with trio.move_on_after(HELLO_TIMEOUT):
            try:
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                while not handshake.authenticated:
                    while not frames:
                        data = await stream.receive_some(RECV_SIZE)
                        if not data:
                            return None
                        frames = decoder.feed(data)
                    frame = frames.pop(0)
                    if frame["k"] == "hello":
                        reply = handshake.on_client_hello(frame)
                    else:
                        reply = handshake.on_auth(frame, self.health())
                    await stream.send_all(wire.encode(reply))
            except (AuthError, wire.WireError) as exc:
                log.warning("refusing connection: %s", exc)
                return None
            except trio.BrokenResourceError as exc:
                log.info("connection lost during the handshake: %s", exc.__cause__ or exc)
                return None
            log.debug("authenticated %s", handshake.peer)
            return frames
        log.warning("dropping connection: no handshake within %ss", HELLO_TIMEOUT)
        return None

    async def _serve(
        self, stream: trio.abc.Stream, decoder: wire.FrameDecoder, early: list[wire.Frame]
    ) -> None:
        """Run the connection (reader here, writer and requests as tasks) until it ends."""
        calls: dict[int, trio.CancelScope] = {}
        writer: FrameWriter | None = None
        try:
            async with trio.open_nursery() as nursery:
                writer = FrameWriter(stream, nursery.cancel_scope, self._replies)
                nursery.start_soon(writer.run)
                try:
                    self._dispatch(early, writer, calls, nursery)
                    while True:
                        data = await _receive(stream, decoder)
                        if not data:
                            break
                        # A large frame's body is joined off the loop (wire.complete).
                        frames = await wire.complete(decoder.feed_deferred(data))
                        self._dispatch(frames, writer, calls, nursery)
                except (wire.WireError, _Dropped) as exc:
                    log.warning("dropping connection: %s", exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the peer went away (or TLS broke)
                nursery.cancel_scope.cancel()
        finally:
            if writer is not None:
                writer.release()  # what it held is garbage now; stop counting it

    def _dispatch(
        self,
        frames: list[wire.Frame],
        writer: FrameWriter,
        calls: dict[int, trio.CancelScope],
        nursery: trio.Nursery,
    ) -> None:
        """Answer pings, fence other rings, start requests, route cancels."""
        for frame in frames:
            kind = frame["k"]
            if kind == "req":
                call_id = frame["i"]
                if call_id in calls:
                    raise _Dropped(f"request id {call_id} already in flight")
                if frame["op"] == "ping":
                    health = {"health": self.health()}
                    writer.send_nowait({"k": "res", "i": call_id, "s": 200, "a": health})
                elif frame["r"] != self.service.ring.version and not wire.ring_free(frame["op"]):
                    writer.send_nowait(self._wrong_ring(call_id, frame["r"]))
                elif len(calls) >= MAX_CALLS:
                    msg = f"over {MAX_CALLS} requests in flight on this connection"
                    writer.send_nowait(_error(call_id, "unavailable", msg))
                else:
                    scope = calls[call_id] = trio.CancelScope()
                    # mypy narrows the frame union on frame["k"], not on the local `kind`
                    nursery.start_soon(self._request, frame, writer, calls, scope)  # type: ignore[arg-type]
            elif kind == "cancel":
                # `scope` was typed by the branch above (never None there)
                scope = calls.get(frame["i"])  # type: ignore[assignment]
                if scope is not None:
                    scope.cancel()
            else:
                raise _Dropped(f"unexpected {kind!r} frame")

    def _wrong_ring(self, call_id: int, theirs: int) -> dict[str, Any]:
        ring = self.service.ring
        msg = f"ring version {theirs} is not this shard's ({ring.version})"
        return {**_error(call_id, "version", msg), "a": {"ring": ring.to_wire()}}

    async def _request(
        self,
        message: wire.RequestFrame,
        writer: FrameWriter,
        calls: dict[int, trio.CancelScope],
        scope: trio.CancelScope,
    ) -> None:
        call_id = message["i"]
        try:
            with scope:
                op = message["op"]
                if op == "http":
                    await self._http(call_id, message, writer)
                elif op in self.handlers:
                    wire.check_args(op, message["a"])
                    with trio.move_on_after(OP_TIMEOUT) as deadline:
                        result = await self.handlers[op](message["a"])
                    if deadline.cancelled_caught:
                        msg = f"{op} took over {OP_TIMEOUT}s"
                        writer.send_nowait(_error(call_id, "unavailable", msg))
                    else:
                        writer.send_nowait({"k": "res", "i": call_id, "s": 200, "a": result})
                else:
                    writer.send_nowait(_error(call_id, "bad_request", f"unknown op {op[:60]!r}"))
        except (StorageUnavailable, PeerUnavailable) as exc:
            writer.send_nowait(_error(call_id, "unavailable", str(exc)))
        except wire.OpError as exc:
            writer.send_nowait(_error(call_id, exc.code, str(exc)))
        except Exception:
            log.exception("request %s failed", call_id)
            writer.send_nowait(_error(call_id, "internal", "internal error"))
        finally:
            calls.pop(call_id, None)

    async def _http(self, call_id: int, message: wire.RequestFrame, writer: FrameWriter) -> None:
        path = message["p"]  # op "http": parse checked that m, p, q, h and b are there
        header_map = {name.lower(): value for name, value in message["h"]}
        try:
            check_canonical(path)
        except PathError as exc:
            raise wire.BadArguments(str(exc)) from None
        if not self.service.owns(path):
            msg = f"not the owner of {path[:100]!r} under ring v{self.service.ring.version}"
            error = _error(call_id, "misdirected", msg)
            writer.send_nowait({**error, "a": {"ring": self.service.ring.to_wire()}})
            return
        request = Request(
            message["m"],
            path,
            message["q"],
            header_map,
            message["b"],
        )

        async def respond(response: Response, more: bool) -> None:
            await writer.send(
                {
                    "k": "res",
                    "i": call_id,
                    "s": response.status,
                    "h": response.headers,
                    "b": response.body,
                    "more": more,
                }
            )

        async def send(data: bytes, more: bool) -> None:
            await writer.send({"k": "chunk", "i": call_id, "b": data, "more": more})

        await self.service.handle_http(request, respond, send)


async def _receive(stream: trio.abc.Stream, decoder: wire.FrameDecoder) -> wire.Received:
    """The next bytes (b"" at EOF). Between frames a peer may idle; once a frame has
    started it must keep coming: a peer that sends half a frame and stalls would hold its
    bytes (up to MAX_FRAME_BYTES) forever."""
    if not decoder.partial:
        return await stream.receive_some(RECV_SIZE)
    now = trio.current_time()
    if decoder.frame_started is None:
        decoder.frame_started = now
    deadline = decoder.frame_started + FRAME_GRACE + (decoder.expected or 4) / MIN_FRAME_RATE
    with trio.move_on_at(min(deadline, now + FRAME_STALL_TIMEOUT)) as stalled:
        return await stream.receive_some(RECV_SIZE)
    assert stalled.cancelled_caught
    raise _Dropped(f"frame of {decoder.expected} bytes stalled at {decoder.partial}")


def _error(call_id: int, code: str, msg: str) -> dict[str, Any]:
    return {"k": "err", "i": call_id, "code": code, "msg": msg}
