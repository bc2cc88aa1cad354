"""The shard's msgpack RPC server: accepts gateway and peer-shard connections.

A connection first authenticates (common/cluster_auth.py: both sides prove the cluster
secret; optionally under TLS) within HELLO_TIMEOUT, with frames of at most
wire.MAX_HANDSHAKE_FRAME bytes; until then it is served nothing. Then the reader of
common/rpc_transport.py decodes frames (checked by `wire.parse`), the connection's state
machine (`rpc_core.ShardProtocol`) admits each request, this module answers `ping` inline
and starts one task per other request in the connection's nursery, and routes `cancel`;
the transport's coalescing writer sends replies.

Every frame is untrusted, and a connection costs bounded memory and time:
  * a frame of the wrong shape, or a protocol breach, closes that connection only (its
    requests are cancelled), with one log line; never the process;
  * a request on another ring version than ours gets `err version` (with our ring) unrun,
    except the ops that exchange rings (wire.RING_FREE_OPS); an http request for a path
    we do not own under our ring gets `err misdirected` (with our ring);
  * replies queued and not yet sent are capped (REPLY_BUDGET per connection,
    PROCESS_REPLY_BUDGET in all): a peer that does not read them is dropped; http
    answers wait instead, above rpc_transport.HIGH_WATER, and a peer that reads nothing
    for rpc_transport.WRITE_STALL (plus the batch's size at MIN_FRAME_RATE) is dropped;
  * a frame that has started must keep arriving (rpc_transport.FrameStalled);
  * at most rpc_core.MAX_CALLS requests run at once per connection; beyond, `err
    unavailable`;
  * registry ops (shard/rpc_ops.py) get OP_TIMEOUT seconds, their arguments checked
    against wire.ARG_SCHEMAS first.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol as Interface

import trio

from ds_cluster.common import rpc_core, wire
from ds_cluster.common.cluster_auth import AuthError, ServerHandshake
from ds_cluster.common.paths import PathError, check_canonical
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_transport import FrameReader, FrameWriter, WriteBudget
from ds_cluster.shard.committer import Job, StorageUnavailable
from ds_cluster.shard.core.model import Request, Response
from ds_cluster.shard.peers import PeerUnavailable
from ds_cluster.shard.polls import ParkedPoll
from ds_cluster.shard.rpc_ops import Handler
from ds_cluster.shard.service import Appended, Settling, ShardService

log = logging.getLogger(__name__)

REPLY_BUDGET = 32 * 1024 * 1024  # unsent reply bytes a connection may hold, then it is dropped
PROCESS_REPLY_BUDGET = 256 * 1024 * 1024  # the same over all connections
HELLO_TIMEOUT = 5.0  # seconds a new connection has to authenticate
OP_TIMEOUT = 30.0  # seconds for a registry op (export_fork, ...)


class Stoppable(Interface):
    """What a request in flight is held as in its connection's calls: its task's cancel
    scope, or a `_Parked` long-poll."""

    def cancel(self) -> None: ...


Protocol = rpc_core.ShardProtocol[Stoppable]

# What an append decided on the spot holds in the connection's calls while it commits (its
# id stays taken, it counts against MAX_CALLS): a `cancel` has nothing left to stop, since
# the write is queued and its answer goes anyway (the caller drops it).
COMMITTING = trio.CancelScope()


# Paths that passed `check_canonical` (a busy stream's every append repeats its path; a
# refused one raises again, it is not kept), looked up by `_local` itself: an
# lru_cache's wrapper cost 700 instructions per append. Emptied when it fills.
_CHECKED_PATHS: set[str] = set()
_CHECKED_PATHS_MAX = 4096


def _check_path(path: str) -> None:
    """`check_canonical`, remembered once it passed."""
    check_canonical(path)
    if len(_CHECKED_PATHS) >= _CHECKED_PATHS_MAX:
        _CHECKED_PATHS.clear()
    _CHECKED_PATHS.add(path)


class CommitAnswers:
    """One connection's appends decided on the spot, answered once their commit is done.

    Jobs complete in the order they were queued (a group commit takes everything queued,
    and a failure fails everything queued), so one task waits for the oldest job and then
    answers every job already done behind it: one wake-up per group commit, not a task
    and an event per append."""

    def __init__(self, service: ShardService, writer: FrameWriter, protocol: Protocol) -> None:
        self._service = service
        self._writer = writer
        self._protocol = protocol
        self._calls = protocol.calls
        # (call id, its job, its Settling or Appended)
        self._queue: deque[tuple[int, Job, Settling | Appended]] = deque()
        self._added = trio.Event()

    def add(self, call_id: int, settling: Settling | Appended) -> None:
        self._calls[call_id] = COMMITTING  # (`protocol.started`, written out)
        queue = self._queue
        if not queue:  # (`run` waits for `_added` only with an empty queue)
            self._added.set()
        queue.append((call_id, settling[1], settling))

    async def run(self) -> None:
        queue = self._queue
        settled = self._service.settled
        settled_append = self._service.settled_append
        send = self._writer.send_parts_nowait
        send_frames = self._writer.send_frames_nowait
        encode = wire.encode_response
        append_answer = wire.append_answer
        calls = self._calls
        while True:
            if not queue:
                await self._added.wait()
                self._added = trio.Event()
                continue
            done = queue[0][1].done
            if not done.is_set():
                await done.wait()
            # The jobs of one group share its `done`: answer them all, queued together,
            # then look again (a later group may be done by now too).
            frames: list[bytes] = []
            while queue and queue[0][1].done is done:
                call_id, _job, settling = queue.popleft()
                calls.pop(call_id, None)  # (`protocol.finished`, written out)
                if len(settling) == 4:  # an Appended
                    offset = settled_append(settling)
                    if isinstance(offset, str):
                        frames.append(append_answer(call_id, offset))
                        continue
                    answer = offset
                else:
                    answer = settled(settling)
                parts = encode(call_id, answer.status, answer.headers, answer.body)
                if len(parts) == 1:
                    frames.append(parts[0])
                else:  # (a large body, sent without a copy: after those before it)
                    if frames:
                        send_frames(frames)
                        frames = []
                    send(parts)
            if frames:
                send_frames(frames)


class _Parked:
    """A long-poll parked on its stream (`shard.polls`) as one of its connection's calls:
    answered by the service (`answer`), or cancelled by the caller (`cancel`)."""

    __slots__ = ("call_id", "nursery", "poll", "protocol", "service", "writer")

    def __init__(
        self,
        call_id: int,
        service: ShardService,
        protocol: Protocol,
        writer: FrameWriter,
        nursery: trio.Nursery,
    ) -> None:
        self.call_id = call_id
        self.service = service
        self.protocol = protocol
        self.writer = writer
        self.nursery = nursery
        self.poll: ParkedPoll | None = None

    def answer(self, outcome: Response | Exception) -> None:
        """Send the answer: at once while the connection's unsent answers are under its
        high-water mark, else from a task that waits for room, as the task path's send."""
        call_id = self.call_id
        self.protocol.finished(call_id)
        if isinstance(outcome, Exception):
            frame = _failure(call_id, outcome)
        else:
            frame = rpc_core.response(call_id, outcome.status, outcome.headers, outcome.body, False)
        writer = self.writer
        if writer.has_room():
            writer.send_nowait(frame)
        else:
            self.nursery.start_soon(writer.send, frame)

    def cancel(self) -> None:
        self.protocol.finished(self.call_id)
        if self.poll is not None:
            self.service.cancel_poll(self.poll)


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
        self._replies = WriteBudget(PROCESS_REPLY_BUDGET)
        health = getattr(service, "health", None)
        self._health: Callable[[], Mapping[str, object]] | None = (
            health if callable(health) else None
        )

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
            reader = FrameReader(stream)
            protocol = await self._authenticate(stream, reader)
            if protocol is not None:
                await self._serve(stream, reader, protocol)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug must cost this connection, never the process
            log.exception("dropping connection: unexpected error")
        finally:
            await trio.aclose_forcefully(stream)

    async def _authenticate(self, stream: trio.abc.Stream, reader: FrameReader) -> Protocol | None:
        """Run the handshake; the connection's state machine, or None (dropped)."""
        ring = self.service.ring.to_wire()
        handshake = ServerHandshake(self._secret, shard_id=self.service.shard_id, ring=ring)
        protocol: Protocol = rpc_core.ShardProtocol(handshake)
        with trio.move_on_after(HELLO_TIMEOUT):
            try:
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                while not protocol.authenticated:
                    frame = await reader.next_frame()
                    if frame is None:
                        return None
                    reply = protocol.on_handshake(frame, self.health())
                    await stream.send_all(wire.encode(reply))
            except (AuthError, wire.WireError) as exc:
                log.warning("refusing connection: %s", exc)
                return None
            except trio.BrokenResourceError as exc:
                log.info("connection lost during the handshake: %s", exc.__cause__ or exc)
                return None
            log.debug("authenticated %s", protocol.peer)
            return protocol
        log.warning("dropping connection: no handshake within %ss", HELLO_TIMEOUT)
        return None

    async def _serve(
        self, stream: trio.abc.Stream, reader: FrameReader, protocol: Protocol
    ) -> None:
        """Run the connection (reader here, writer and requests as tasks) until it ends."""
        writer: FrameWriter | None = None
        try:
            async with trio.open_nursery() as nursery:
                writer = FrameWriter(stream, nursery.cancel_scope, REPLY_BUDGET, self._replies)
                nursery.start_soon(writer.run)
                answers = CommitAnswers(self.service, writer, protocol)
                nursery.start_soon(answers.run)
                try:
                    frames: list[wire.Frame] | None = reader.authenticated()
                    while frames is not None:
                        self._dispatch(frames, protocol, writer, answers, nursery)
                        frames = await reader.frames()
                except wire.WireError as exc:
                    log.warning("dropping connection: %s", exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the peer went away (or TLS broke)
                finally:
                    _drop_parked(protocol)
                nursery.cancel_scope.cancel()
        finally:
            if writer is not None:
                writer.release()  # what it held is garbage now; stop counting it

    def _dispatch(
        self,
        frames: list[wire.Frame],
        protocol: Protocol,
        writer: FrameWriter,
        answers: CommitAnswers,
        nursery: trio.Nursery,
    ) -> None:
        """Answer pings, fence other rings, decide appends on the spot, start other
        requests, route cancels. The ring is read once for the whole batch: nothing here
        waits, so it cannot change before the batch is dispatched."""
        ring = self.service.ring
        for frame in frames:
            if frame["k"] == "append":
                if self._append_typed(frame, ring, protocol, writer, answers):
                    continue
                frame = wire.general_request(frame)  # (served as the request it stands for)
            if frame["k"] == "req":
                op = frame["op"]
                if op == "ping":
                    if frame["i"] in protocol.calls:
                        raise rpc_core.ProtocolError(f"request id {frame['i']} already in flight")
                    writer.send_nowait(rpc_core.result(frame["i"], {"health": self.health()}))
                    continue
                refusal = protocol.admit(frame, ring)
                if refusal is not None:
                    writer.send_nowait(refusal)
                    continue
                if op == "http":
                    method = frame["m"]
                    if method == "POST":
                        if self._append_now(frame, ring, writer, answers):
                            continue
                    elif (method == "GET" or method == "HEAD") and writer.has_room():
                        # (with its answers backed up, the task path waits for room)
                        request = self._local_request(frame, ring)
                        if request is not None and (
                            self._park_now(frame, request, protocol, writer, nursery)
                            or self._read_now(frame, request, writer)
                        ):
                            continue
                scope = trio.CancelScope()
                protocol.started(frame["i"], scope)
                nursery.start_soon(self._request, frame, protocol, writer, scope)
            elif frame["k"] == "cancel":
                running = protocol.on_cancel(frame)
                if running is not None:
                    running.cancel()
            else:
                raise rpc_core.ProtocolError(f"unexpected {frame['k']!r} frame")

    def _append_typed(
        self,
        message: wire.AppendFrame,
        ring: Ring,
        protocol: Protocol,
        writer: FrameWriter,
        answers: CommitAnswers,
    ) -> bool:
        """Decide an `append` frame's plain append without a task, from its fields
        (`ShardService.append_typed`), once `protocol` admits it: its answer goes now, or
        from `answers` once its group commit is done. False: serve it as the request it
        stands for (a refusal to answer, a path to refuse, not a plain append after all,
        ...; nothing was changed or sent)."""
        call_id = message["i"]
        if not protocol.admits(call_id, message["r"], ring):
            return False
        path = message["p"]
        if not self._local(path, ring):
            return False
        try:
            appended = self.service.append_typed(path, message["c"], message["b"])
        except Exception as exc:
            writer.send_nowait(_failure(call_id, exc))
            return True
        if appended is None:
            return False
        answers.add(call_id, appended)
        return True

    def _append_now(
        self,
        message: wire.RequestFrame,
        ring: Ring,
        writer: FrameWriter,
        answers: CommitAnswers,
    ) -> bool:
        """Decide an append without a task, a plain one from the frame's fields
        (`ShardService.append_now`, no Request built), any other by
        `ShardService.decide_now`: its answer goes now, or from `answers` once its group
        commit is done. False: run it as a task (a path to refuse, a large body, a stream
        moving, ...; nothing was changed)."""
        call_id = message["i"]
        path = message["p"]
        if not self._local(path, ring):
            return False
        headers = {}
        for name, value in message["h"]:  # (a loop: a comprehension is a call of its own)
            headers[name.lower()] = value
        body = message["b"]
        try:
            appended = self.service.append_now(path, headers, body)
        except Exception as exc:
            writer.send_nowait(_failure(call_id, exc))
            return True
        if appended is not None:
            answers.add(call_id, appended)
            return True
        request = Request("POST", path, message["q"], headers, body)
        try:
            outcome = self.service.decide_now(request)
        except Exception as exc:
            writer.send_nowait(_failure(call_id, exc))
            return True
        if outcome is None:
            return False
        if isinstance(outcome, tuple):  # a Settling
            answers.add(call_id, outcome)
        else:
            writer.send_parts_nowait(
                wire.encode_response(call_id, outcome.status, outcome.headers, outcome.body)
            )
        return True

    def _local(self, path: str, ring: Ring) -> bool:
        """Whether `path` is a stream path this shard owns under `ring` (the current one);
        False for a bad path, or another shard's: the task path answers those."""
        if path not in _CHECKED_PATHS:
            try:
                _check_path(path)
            except PathError:
                return False
        return ring.owner(path) == self.service.shard_id

    def _local_request(self, message: wire.RequestFrame, ring: Ring) -> Request | None:
        """The core's request for an HTTP frame on a path this shard owns under `ring`
        (the current one), or None (see `_local`)."""
        path = message["p"]
        if not self._local(path, ring):
            return None
        headers = {}
        for name, value in message["h"]:  # (a loop: a comprehension is a call of its own)
            headers[name.lower()] = value
        return Request(message["m"], path, message["q"], headers, message["b"])

    def _read_now(self, message: wire.RequestFrame, request: Request, writer: FrameWriter) -> bool:
        """Answer a read (`request`, of `message`) without a task (`ShardService.read_now`)
        when it can be answered at once from this shard. False: run it as a task; nothing
        was sent."""
        try:
            answer = self.service.read_now(request)
        except Exception as exc:
            writer.send_nowait(_failure(message["i"], exc))
            return True
        if answer is None:
            return False
        response, token = answer
        call_id, body = message["i"], response.body
        hit = bool(token) and token == message["t"]  # the caller holds this very body
        if hit:
            self.service.counters.read_bytes_unsent += len(body)
            body = b""
        writer.send_parts_nowait(
            wire.encode_response(call_id, response.status, response.headers, body, token, hit)
        )
        return True

    def _park_now(
        self,
        message: wire.RequestFrame,
        request: Request,
        protocol: Protocol,
        writer: FrameWriter,
        nursery: trio.Nursery,
    ) -> bool:
        """Park a long-poll (`request`, of `message`) that must wait on its stream
        (`ShardService.park_now`), to be answered without a task (asked before `_read_now`:
        most live reads wait). False: answer it otherwise; nothing was parked or sent."""
        if "long-poll" not in message["q"]:
            return False
        call_id = message["i"]
        parked = _Parked(call_id, self.service, protocol, writer, nursery)
        try:
            poll = self.service.park_now(request, parked.answer)
        except Exception as exc:
            writer.send_nowait(_failure(call_id, exc))
            return True
        if poll is None:
            return False
        parked.poll = poll
        protocol.started(call_id, parked)
        return True

    async def _request(
        self,
        message: wire.RequestFrame,
        protocol: Protocol,
        writer: FrameWriter,
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
                        writer.send_nowait(rpc_core.error(call_id, "unavailable", msg))
                    else:
                        writer.send_nowait(rpc_core.result(call_id, result))
                else:
                    msg = f"unknown op {op[:60]!r}"
                    writer.send_nowait(rpc_core.error(call_id, "bad_request", msg))
        except Exception as exc:
            writer.send_nowait(_failure(call_id, exc))
        finally:
            protocol.finished(call_id)

    async def _http(self, call_id: int, message: wire.RequestFrame, writer: FrameWriter) -> None:
        path = message["p"]  # op "http": parse checked that m, p, q, h and b are there
        header_map = {name.lower(): value for name, value in message["h"]}
        try:
            check_canonical(path)
        except PathError as exc:
            raise wire.BadArguments(str(exc)) from None
        if not self.service.owns(path):
            ring = self.service.ring
            msg = f"not the owner of {path[:100]!r} under ring v{ring.version}"
            writer.send_nowait(rpc_core.ring_error(call_id, "misdirected", msg, ring))
            return
        request = Request(message["m"], path, message["q"], header_map, message["b"])

        async def respond(response: Response, more: bool) -> None:
            await writer.send(
                rpc_core.response(call_id, response.status, response.headers, response.body, more)
            )

        chunks = _Chunks(call_id, writer)
        await self.service.handle_http(request, respond, chunks.send, chunks)


class _Chunks:
    """A streamed answer's chunks on its connection: sent by the request's task (`send`,
    which waits while the connection's unsent answers are over their high-water mark),
    or pushed by a commit's task (`room`, `push`: `shard.live_sse.LiveSink`)."""

    __slots__ = ("call_id", "writer")

    def __init__(self, call_id: int, writer: FrameWriter) -> None:
        self.call_id = call_id
        self.writer = writer

    async def send(self, data: bytes, more: bool) -> None:
        await self.writer.send(rpc_core.chunk(self.call_id, data, more))

    def room(self) -> bool:
        return self.writer.has_room()

    def push(self, data: bytes, more: bool) -> None:
        self.writer.send_now(rpc_core.chunk(self.call_id, data, more))


def _drop_parked(protocol: Protocol) -> None:
    """The connection ends: its parked long-polls leave their streams, unanswered."""
    for handle in list(protocol.calls.values()):
        if isinstance(handle, _Parked):
            handle.cancel()


def _failure(call_id: int, exc: Exception) -> wire.Outgoing:
    """The `err` frame for a request that raised: `unavailable` when the storage or a peer
    is, the code of an `OpError`, else `internal` (logged: a bug)."""
    if isinstance(exc, StorageUnavailable | PeerUnavailable):
        return rpc_core.error(call_id, "unavailable", str(exc))
    if isinstance(exc, wire.OpError):
        return rpc_core.error(call_id, exc.code, str(exc), exc.args_map)
    log.error("request %s failed", call_id, exc_info=exc)
    return rpc_core.error(call_id, "internal", "internal error")
