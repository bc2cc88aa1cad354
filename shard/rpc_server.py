"""The shard's msgpack RPC server: accepts gateway and peer-shard connections.

Each connection gets a reader (decodes frames, starts one task per request in the
connection's nursery, routes `cancel`), and a coalescing writer (everything queued while
a send is in progress goes out in one `send_all`, with backpressure for streaming bodies).
A malformed frame closes that connection only; its in-flight requests are cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio

from common import wire
from common.paths import PathError, check_canonical
from shard.committer import StorageUnavailable
from shard.core.model import Request, Response
from shard.peers import PeerUnavailable
from shard.rpc_ops import Handler
from shard.service import ShardService

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024  # buffered bytes before streaming senders wait
HELLO_TIMEOUT = 5.0  # seconds a new connection has to complete its hello frame


class FrameWriter:
    """Queues frames and writes them in coalesced batches from one task."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._frames: list[bytes] = []
        self._size = 0
        self._wake = trio.Event()
        self._drained = trio.Event()

    def send_nowait(self, message: dict[str, Any]) -> None:
        frame = wire.encode(message)
        self._frames.append(frame)
        self._size += len(frame)
        self._wake.set()

    async def send(self, message: dict[str, Any]) -> None:
        """Queue a frame, waiting first while the peer is not keeping up."""
        while self._size > HIGH_WATER:
            await self._drained.wait()
        self.send_nowait(message)

    async def run(self, on_broken: trio.CancelScope) -> None:
        """Write until cancelled; a broken connection cancels `on_broken` (the connection)."""
        try:
            while True:
                if not self._frames:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                frames, self._frames = self._frames, []
                self._size = 0
                self._drained.set()
                self._drained = trio.Event()
                for data in wire.coalesce(frames):
                    await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            on_broken.cancel()


class RpcServer:
    """Serves `http` and `ping` itself; every other op is looked up in `handlers`."""

    def __init__(self, service: ShardService, handlers: Mapping[str, Handler]) -> None:
        self.service = service
        self.handlers = handlers

    async def serve(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        decoder = wire.FrameDecoder()
        writer = FrameWriter(stream)
        calls: dict[int, trio.CancelScope] = {}
        greeted = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, nursery.cancel_scope)
            hello_deadline = trio.current_time() + HELLO_TIMEOUT
            while True:
                data = b""
                try:
                    if greeted:
                        data = await stream.receive_some(RECV_SIZE)
                    else:
                        # Until it has said hello, a connection gets HELLO_TIMEOUT seconds:
                        # a peer that sends half a frame and stalls is dropped.
                        with trio.move_on_at(hello_deadline):
                            data = await stream.receive_some(RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
                if not data:
                    if not greeted and trio.current_time() >= hello_deadline:
                        log.warning("dropping connection: no hello within %ss", HELLO_TIMEOUT)
                    break
                try:
                    messages = decoder.feed(data)
                except wire.WireError as exc:
                    log.warning("dropping connection: %s", exc)
                    break
                for message in messages:
                    kind = message["k"]
                    if not greeted:
                        if kind != "hello":
                            log.warning("dropping connection: first frame is not hello")
                            nursery.cancel_scope.cancel()
                            return
                        greeted = True
                        writer.send_nowait(self._hello())
                    elif kind == "req":
                        call_id = message.get("i")
                        if not isinstance(call_id, int) or call_id in calls:
                            log.warning("dropping connection: bad request id %r", call_id)
                            nursery.cancel_scope.cancel()
                            return
                        scope = trio.CancelScope()
                        calls[call_id] = scope
                        nursery.start_soon(self._request, message, writer, calls, scope)
                    elif kind == "cancel":
                        scope = calls.get(message.get("i"))  # type: ignore[arg-type]
                        if scope is not None:
                            scope.cancel()
            nursery.cancel_scope.cancel()

    def _hello(self) -> dict[str, Any]:
        service = self.service
        return {
            "k": "hello",
            "role": "shard",
            "id": service.shard_id,
            "ring": service.ring.to_wire(),
        }

    async def _request(
        self,
        message: dict[str, Any],
        writer: FrameWriter,
        calls: dict[int, trio.CancelScope],
        scope: trio.CancelScope,
    ) -> None:
        call_id = message["i"]
        try:
            with scope:
                op = message.get("op")
                if op == "http":
                    await self._http(call_id, message, writer)
                elif op == "ping":
                    writer.send_nowait({"k": "res", "i": call_id, "s": 200, "a": {}})
                elif isinstance(op, str) and op in self.handlers:
                    args = message.get("a")
                    if not isinstance(args, dict):
                        raise wire.BadArguments("missing arguments")
                    result = await self.handlers[op](args)
                    writer.send_nowait({"k": "res", "i": call_id, "s": 200, "a": result})
                else:
                    writer.send_nowait(_error(call_id, "bad_request", f"unknown op {op!r}"))
        except (StorageUnavailable, PeerUnavailable) as exc:
            writer.send_nowait(_error(call_id, "unavailable", str(exc)))
        except wire.OpError as exc:
            writer.send_nowait(_error(call_id, exc.code, str(exc)))
        except Exception:
            log.exception("request %s failed", call_id)
            writer.send_nowait(_error(call_id, "internal", "internal error"))
        finally:
            calls.pop(call_id, None)

    async def _http(self, call_id: int, message: dict[str, Any], writer: FrameWriter) -> None:
        method, path, query, headers, body = (
            message.get("m"),
            message.get("p"),
            message.get("q", ""),
            message.get("h", ()),
            message.get("b", b""),
        )
        if not (
            isinstance(method, str)
            and isinstance(path, str)
            and isinstance(query, str)
            and isinstance(headers, list | tuple)
            and isinstance(body, bytes)
        ):
            raise wire.BadArguments("malformed http request")
        try:
            header_map = {str(k).lower(): str(v) for k, v in headers}
        except (TypeError, ValueError):
            raise wire.BadArguments("malformed headers") from None
        try:
            check_canonical(path)
        except PathError as exc:
            raise wire.BadArguments(str(exc)) from None
        if not self.service.owns(path):
            writer.send_nowait(
                {"k": "res", "i": call_id, "s": 421, "h": [], "b": b"misdirected", "more": False}
            )
            return
        request = Request(method, path, query, header_map, body)

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


def _error(call_id: int, code: str, msg: str) -> dict[str, Any]:
    return {"k": "err", "i": call_id, "code": code, "msg": msg}
