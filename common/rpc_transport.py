"""The RPC's trio transport: moves frames between a socket and the sans-IO core.

One `FrameReader` and one `FrameWriter` per connection, on both ends (the caller's,
common/rpc_client.py, and the shard's, shard/rpc_server.py). Everything read comes from
an untrusted peer, so every wait has a deadline and every buffer a bound:

  * reading: between frames a peer may idle (liveness is the caller's heartbeat), but a
    frame that has started must keep coming: FRAME_STALL seconds without a byte, or
    slower than MIN_FRAME_RATE after FRAME_GRACE, and `FrameStalled` drops the
    connection (else a peer could hold up to MAX_FRAME_BYTES of ours with half a frame);
  * large frames are joined off the event loop (`wire.complete`);
  * writing: the frames a scheduler batch queued go out in one write when the batch ends
    (`batch_end`), and one task writes what the socket did not take then (many small
    replies in one send either way); a batch the peer does not read for WRITE_STALL
    seconds (plus its size at MIN_FRAME_RATE) drops the connection; queued bytes are
    bounded per connection and, optionally, per process (`WriteBudget`).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Mapping

import trio

from ds_cluster.common import batch_end, tcp, wire
from ds_cluster.common.rpc_core import CallState

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024  # bytes asked of the socket per read
FRAME_STALL = 10.0  # seconds a started frame may go without a byte
FRAME_GRACE = 10.0  # seconds any frame gets, plus its size at MIN_FRAME_RATE
MIN_FRAME_RATE = 1024 * 1024  # bytes/s
WRITE_STALL = 15.0  # seconds a write may wait on a peer that does not read
HIGH_WATER = 4 * 1024 * 1024  # unsent bytes above which `FrameWriter.send` waits
FRAME_OVERHEAD = 128  # bytes a queued frame costs beyond its length (object, list slot)


class FrameStalled(wire.WireError):
    """A frame the peer started stopped arriving (or crawls): drop the connection."""


def socket_fd(stream: trio.abc.Stream) -> int | None:
    """The file descriptor of a plain TCP stream, read and written directly (`os.read`,
    `os.write`, waiting with trio's `wait_readable` / `wait_writable`): trio's stream
    methods cost an async context manager and a scheduler round per call, which a shard
    paid once per read and per write. None for TLS, which goes through trio."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    return None


class FrameReader:
    """Frames from one connection: one at a time during the handshake (small frames,
    `next_frame`), then in batches as they arrive (`frames`)."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = wire.MAX_HANDSHAKE_FRAME):
        self._stream = stream
        self._fd = socket_fd(stream)
        self._more = False  # the last direct read filled its buffer: more may be waiting
        self.decoder = wire.FrameDecoder(max_frame)
        self._early: deque[wire.Frame] = deque()  # decoded, not yet taken

    async def next_frame(self) -> wire.Frame | None:
        """The next frame (None: the peer closed). For the handshake: no deadline of its
        own (the handshake has one), no deferred join (its frames are small)."""
        while not self._early:
            data = await self._stream.receive_some(RECV_SIZE)
            if not data:
                return None
            self._early.extend(self.decoder.feed(data))
        return self._early.popleft()

    def authenticated(self) -> list[wire.Frame]:
        """The peer proved itself: frames may now be large. Returns the frames that
        came right behind the handshake."""
        self.decoder.max_frame = wire.MAX_FRAME_BYTES
        early = list(self._early)
        self._early.clear()
        return early

    async def frames(self) -> list[wire.Frame] | None:
        """The frames the next read completes (maybe none; None: the peer closed)."""
        data = await self._receive()
        if not data:
            return None
        items = self.decoder.feed_deferred(data)
        for item in items:
            if type(item) is wire.Unjoined:
                return await wire.complete(items)
        return items  # type: ignore[return-value]  # no Unjoined: no join, no coroutine

    async def _receive(self) -> wire.Received:
        decoder = self.decoder
        if not decoder.partial:
            if self._fd is not None:
                return await self._read(self._fd)
            return await self._stream.receive_some(RECV_SIZE)
        now = trio.current_time()
        if decoder.frame_started is None:
            decoder.frame_started = now
        need = decoder.expected or 4
        deadline = decoder.frame_started + FRAME_GRACE + need / MIN_FRAME_RATE
        with trio.move_on_at(min(deadline, now + FRAME_STALL)):
            if self._fd is not None:
                return await self._read(self._fd)
            return await self._stream.receive_some(RECV_SIZE)
        raise FrameStalled(f"frame of {decoder.expected} bytes stalled at {decoder.partial}")

    async def _read(self, fd: int) -> bytes:
        """The next bytes from the socket (b"": the peer closed). After a read that
        filled its buffer, the next one is tried at once (after a checkpoint, so a flood
        of frames never starves the loop); otherwise the socket is waited on first, since
        reading would most likely find nothing."""
        if self._more:
            await trio.lowlevel.checkpoint()
            try:
                data = os.read(fd, RECV_SIZE)
            except BlockingIOError:
                pass
            else:
                self._more = len(data) == RECV_SIZE
                return data
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, RECV_SIZE)
            except BlockingIOError:
                continue
            self._more = len(data) == RECV_SIZE
            return data


class WriteBudget:
    """Unsent bytes over every connection of a process that shares it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class FrameWriter:
    """Queues frames and writes them in coalesced batches: at the end of the scheduler
    batch that queued them, or from one task (`run`).

    On a plain TCP socket with nothing being written, the frames a batch queues are
    written when it ends (`batch_end`), in one write: a lone request or reply reaches the
    peer without waking the writer task and waiting for the next batch, and a burst (a
    group commit's answers, a busy gateway's requests) still goes in one write, so the
    peer sees it whole (a first frame sent apart would make a commit group of its own).
    What the socket does not take then, and everything under TLS, the task writes.

    Three ways in. `try_queue` (a caller's requests) queues within the budgets or says
    no. `send_nowait` (answers that cannot wait: pings, op results, errors) queues within
    the budgets or else drops the connection: a peer that leaves that much unread is not
    reading. `send` (streamed answers) waits while more than HIGH_WATER bytes are
    unsent (`send_now`: the same, for a caller that checked `has_room`). Whatever the
    budgets, a connection with nothing unsent may always queue one frame, so a large one
    still goes. A queued frame may have an owner (a request), told `sent` when its batch
    is handed to the socket."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: trio.CancelScope,
        budget: int,
        shared: WriteBudget | None = None,
    ) -> None:
        self._stream = stream
        self._fd = socket_fd(stream)
        tcp.allow_unsent(stream)  # a large frame in few writes (common.tcp)
        self._connection = connection
        self._budget = budget
        self._shared = shared if shared is not None else WriteBudget(budget)
        self._frames: list[bytes] = []
        self._owners: list[CallState | None] = []  # parallel to _frames: no tuple per frame
        self._size = 0  # queued bytes (with FRAME_OVERHEAD each)
        self._writing = 0  # bytes of the batch being written
        self._wake = trio.Event()
        self._drained = trio.Event()
        self.overflowed = False
        self._batch_end = batch_end.current()
        self._token = trio.lowlevel.current_trio_token()
        self._flush_due = False  # `_flush` is due at the end of the running batch
        self._closed = False  # `run` is over: the socket may be closed, its fd reused

    def try_queue(self, parts: list[bytes], owner: CallState | None = None) -> bool:
        """Queue one frame's pieces (`wire.encode_parts`) if the budgets allow."""
        if len(parts) == 1:
            (frame,) = parts
            cost = len(frame) + FRAME_OVERHEAD
        else:
            frame = None
            cost = sum(map(len, parts)) + FRAME_OVERHEAD
        held = self._size + self._writing
        shared = self._shared
        if held and (held + cost > self._budget or shared.used + cost > shared.limit):
            return False
        # _queue, inlined: every request passes here
        if frame is not None:
            self._frames.append(frame)
            self._owners.append(owner)
        else:
            self._frames += parts
            self._owners += [owner] * len(parts)
        self._size += cost
        shared.used += cost
        if not self._flush_due:  # (else due already: every frame of a batch asks)
            self._due()
        return True

    def send_nowait(self, frame: wire.Outgoing | Mapping[str, object]) -> None:
        if self.overflowed:
            return
        if not self.try_queue(wire.encode_parts(frame)):
            self._overflow()

    def send_parts_nowait(self, parts: list[bytes]) -> None:
        """`send_nowait` of a frame already encoded (`wire.encode_response`)."""
        if self.overflowed:
            return
        if not self.try_queue(parts):
            self._overflow()

    def send_frames_nowait(self, frames: list[bytes]) -> None:
        """`send_parts_nowait` of each of `frames` (whole frames of one piece each, as
        `wire.encode_response` makes most), queued in one step when the budgets take them
        all: a group commit's answers to one connection, one call instead of one each."""
        if self.overflowed:
            return
        cost = sum(map(len, frames)) + FRAME_OVERHEAD * len(frames)
        shared = self._shared
        if self._size + self._writing + cost > self._budget or shared.used + cost > shared.limit:
            for frame in frames:  # one by one, as each would have been queued alone
                self.send_parts_nowait([frame])
            return
        self._frames += frames
        self._owners += [None] * len(frames)
        self._size += cost
        shared.used += cost
        if not self._flush_due:
            self._due()

    def _overflow(self) -> None:
        """The peer left more unread than the budgets allow: drop the connection."""
        held = self._size + self._writing
        self.overflowed = True
        self.release()
        log.warning("dropping connection: peer left over %d bytes unread", held)
        self._connection.cancel()

    def has_room(self) -> bool:
        """Whether `send` would queue at once (no more than HIGH_WATER bytes unsent)."""
        return self._size + self._writing <= HIGH_WATER

    async def send(self, frame: wire.Outgoing | Mapping[str, object]) -> None:
        """Queue a frame, waiting first while the peer is not keeping up."""
        while self._size + self._writing > HIGH_WATER:
            await self._drained.wait()
        self.send_now(frame)

    def send_now(self, frame: wire.Outgoing | Mapping[str, object]) -> None:
        """`send` without its wait, for a caller that found `has_room` just now (a live
        SSE chunk pushed from the shard's commit): the same bound, checked by the caller."""
        if not self.overflowed:
            parts = wire.encode_parts(frame)
            self._queue(parts, _cost(parts), None)

    def _queue(self, parts: list[bytes], cost: int, owner: CallState | None) -> None:
        """One frame's pieces (a large body is one, sent without a copy)."""
        self._frames += parts
        if len(parts) == 1:
            self._owners.append(owner)
        else:
            self._owners += [owner] * len(parts)
        self._size += cost
        self._shared.used += cost
        self._due()

    def _due(self) -> None:
        """Frames were queued: flush them when the batch ends, unless the task is
        writing (it takes them next) or the socket is TLS (the task writes it all)."""
        if self._flush_due:
            return
        if self._writing or self._fd is None or self._closed:
            self._wake.set()
            return
        self._flush_due = True
        self._batch_end.due.append(self._flush)

    def _flush(self) -> None:
        """At the end of the batch: write what it queued, in one write. What the socket
        does not take (or a large frame, not copied into a join here) is left for the
        task, woken through the run's token (see `batch_end`)."""
        self._flush_due = False
        frames = self._frames
        fd = self._fd
        if fd is None or self._closed or self._writing or not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        if len(data) >= wire.RAW_BODY_BYTES and len(frames) > 1:
            self._token.run_sync_soon(self._wake.set)
            return
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            log.info("connection lost (write): %s", exc)
            self._token.run_sync_soon(self._connection.cancel)
            return
        for owner in self._owners:
            if owner is not None:
                owner.sent = True
        if written == len(data):
            self._frames = []
            self._owners = []
            self._shared.used -= self._size
            if self._size > HIGH_WATER:  # a `send` may wait for room (woken as above)
                self._token.run_sync_soon(self._set_drained)
            self._size = 0
            return
        rest = data[written:]
        self._frames = [rest]
        self._owners = [None]
        cost = len(rest) + FRAME_OVERHEAD
        self._shared.used -= self._size - cost
        self._size = cost
        self._token.run_sync_soon(self._wake.set)

    def _set_drained(self) -> None:
        self._drained.set()
        self._drained = trio.Event()

    def discard(self, owner: CallState) -> None:
        """Drop `owner`'s frame, if still queued (its caller gave up before it went)."""
        if owner not in self._owners:
            return
        frames: list[bytes] = []
        owners: list[CallState | None] = []
        dropped = FRAME_OVERHEAD
        for frame, queued_for in zip(self._frames, self._owners, strict=True):
            if queued_for is owner:
                dropped += len(frame)
            else:
                frames.append(frame)
                owners.append(queued_for)
        self._frames, self._owners = frames, owners
        self._size -= dropped
        self._shared.used -= dropped

    def release(self) -> None:
        """The connection is over: its unsent bytes no longer count."""
        self._shared.used -= self._size + self._writing
        self._frames = []
        self._owners = []
        self._size = self._writing = 0

    async def run(self) -> None:
        """Write until cancelled; a broken or stalled peer cancels the connection."""
        try:
            while True:
                if not self._frames:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                frames, self._frames = self._frames, []
                owners, self._owners = self._owners, []
                self._writing, self._size = self._size, 0
                for owner in owners:
                    if owner is not None:
                        owner.sent = True
                del owners
                self._drained.set()
                self._drained = trio.Event()
                for data in wire.coalesce(frames):
                    written = self._write_now(data)
                    if written == len(data):
                        continue
                    with trio.move_on_after(WRITE_STALL + len(data) / MIN_FRAME_RATE) as stalled:
                        await self._write_rest(data, written)
                    if stalled.cancelled_caught:
                        log.warning("dropping connection: peer reads no replies")
                        self._connection.cancel()
                        return
                del frames, data
                self._shared.used -= self._writing
                self._writing = 0
                self._drained.set()
                self._drained = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("connection lost (write): %s", exc)
            self._connection.cancel()
        finally:
            self._closed = True

    def _write_now(self, data: bytes) -> int:
        """Bytes of `data` the socket takes at once, without waiting (0 under TLS)."""
        if self._fd is None:
            return 0
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0

    async def _write_rest(self, data: bytes, written: int) -> None:
        """Write `data` from `written` on, waiting for the peer to read."""
        fd = self._fd
        if fd is None:
            await self._stream.send_all(data)
            return
        view = memoryview(data)[written:]
        while view:
            await trio.lowlevel.wait_writable(fd)
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue


def _cost(parts: list[bytes]) -> int:
    return (len(parts[0]) if len(parts) == 1 else sum(map(len, parts))) + FRAME_OVERHEAD
