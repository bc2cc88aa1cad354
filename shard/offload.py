"""Large request bodies are cut into records before the core sees them, off the event loop.

Validating and cutting a multi-megabyte JSON body takes seconds of CPU, and the `json`
decoder holds the GIL, so it runs in a worker process (`shard.plan_worker`, one per
shard, started on first use, exiting with the shard; bodies queue for it in order).
Slicing the body into record pieces is a memcpy, done here in steps with a checkpoint
between them. The core asks for this (`NeedBody`) only for a large body it is about to
read, then turns the pieces into records (`core.bodies`); small bodies never come here.

While a stream has a large body in preparation, its later writes queue behind it (`_gates`,
FIFO), so writes still take effect in arrival order (producer sequences stay in order).
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable

import msgpack
import trio

from ds_cluster.shard.core import bodies, jsonmode
from ds_cluster.shard.core.model import BodyPieces, Request
from ds_cluster.shard.plan_worker import HEADER

log = logging.getLogger(__name__)

PLAN_TIMEOUT = 120.0  # seconds a body may wait for and take in the worker (64 MiB: ~5 s)
MAX_PLAN_REPLY = 64 * 1024 * 1024  # bytes; a plan is ~24 bytes per 64 KiB record
SLICE_STEP_BYTES = 1024 * 1024  # body bytes copied between two checkpoints
READS = ("GET", "HEAD")

Handle = Callable[[Request], Awaitable[None]]


class BodyOffload:
    def __init__(self) -> None:
        self._gates: dict[str, trio.Lock] = {}
        self._worker = PlanWorker()

    def engaged(self, request: Request) -> bool:
        """Whether `request` must go through `run`: a write whose body may be large
        enough to cut off the loop, or any write on a stream that has one in progress."""
        if request.method in READS:
            return False
        return request.path in self._gates or len(request.body) > bodies.OFFLOAD_JSON_BYTES

    def engaged_write(self, path: str, body: bytes) -> bool:
        """`engaged` of a write (not a read) on `path` sending `body`."""
        return path in self._gates or len(body) > bodies.OFFLOAD_JSON_BYTES

    async def run(self, request: Request, handle: Handle) -> None:
        """`handle` the request in its stream's write order, offering the core to defer
        a large body (it answers NeedBody if it needs it; see `prepare`)."""
        path = request.path
        gate = self._gates.get(path)
        if gate is None:
            gate = self._gates[path] = trio.Lock()
        try:
            async with gate:
                await handle(dataclasses.replace(request, defer_body=True))
        finally:
            if not gate.locked() and self._gates.get(path) is gate:
                del self._gates[path]

    async def prepare(self, request: Request, json_body: bool) -> Request | None:
        """`request` with its body cut (NeedBody); None if that could not be done (the
        request must then fail as not applied)."""
        body = request.body
        if json_body:
            plan: jsonmode.Plan | None = None
            with trio.move_on_after(PLAN_TIMEOUT):
                try:
                    plan = await self._worker.plan(body)
                except WorkerFailed as exc:
                    log.error("JSON body worker failed: %s", exc)
                    return None
            if plan is None:
                log.error("JSON body of %d bytes not planned within %ss", len(body), PLAN_TIMEOUT)
                return None
        else:
            plan = bodies.binary_plan(len(body))
        return dataclasses.replace(request, body_pieces=await self._cut(body, json_body, plan))

    async def _cut(self, body: bytes, json_body: bool, plan: jsonmode.Plan) -> BodyPieces:
        if isinstance(plan, str):
            return BodyPieces(json_body, (), plan)
        pieces: list[tuple[bytes, int]] = []
        copied = 0
        for start, stop, count in plan:
            pieces.append((body[start:stop], count))
            copied += stop - start
            if copied >= SLICE_STEP_BYTES:
                copied = 0
                await trio.lowlevel.checkpoint()
        return BodyPieces(json_body, tuple(pieces))


class WorkerFailed(Exception):
    pass


class PlanWorker:
    """The shard's `plan_worker` process: one body at a time, FIFO. A job that is
    cancelled (its client left, or PLAN_TIMEOUT) kills the process, since the pipe
    is then mid-message; the next job starts a new one."""

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._process: trio.Process | None = None
        self._pending = b""  # bytes read from the worker beyond the last reply

    async def plan(self, body: bytes) -> jsonmode.Plan:
        async with self._lock:
            process = self._process
            if process is None or process.returncode is not None:
                process = self._process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "ds_cluster.shard.plan_worker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                self._pending = b""
            assert process.stdin is not None and process.stdout is not None
            try:
                await process.stdin.send_all(HEADER.pack(len(body)))
                await process.stdin.send_all(body)  # written from `body` itself, no copy
                size = HEADER.unpack(await self._read(process.stdout, HEADER.size))[0]
                if size > MAX_PLAN_REPLY:
                    raise WorkerFailed(f"reply of {size} bytes")
                reply = msgpack.unpackb(await self._read(process.stdout, size))
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self._stop()
                if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
                    raise WorkerFailed(f"worker gone: {exc!r}") from exc
                raise
        if isinstance(reply, str):
            return reply
        return tuple((start, stop, count) for start, stop, count in reply)

    async def _read(self, stream: trio.abc.ReceiveStream, size: int) -> bytes:
        pieces: list[bytes | bytearray] = [self._pending]
        have = len(self._pending)
        while have < size:
            data = await stream.receive_some(max(size - have, 65536))
            if not data:
                raise WorkerFailed("worker exited")
            pieces.append(data)
            have += len(data)
        data = b"".join(pieces)
        self._pending = data[size:]
        return data[:size]

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            await process.wait()
