"""`gateway.readiness` on real sockets: a waiting reader wakes when bytes arrive, an event
for a reader that is not waiting is kept for its next wait, a cancelled wait leaves no
task behind, and forgetting a closed socket does not unregister the one that reuses its
number. (Its use by real HTTP/1.1 connections: tests/test_http1.py.)"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from ds_cluster.gateway.readiness import ReadReadiness


class _Reader:
    def __init__(self) -> None:
        self.read_task: trio.lowlevel.Task | None = None
        self.readable = False

    def read_here(self) -> bool:
        return False  # (the waiting task reads)


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


@asynccontextmanager
async def _watched(
    early: bytes = b"",
) -> AsyncIterator[tuple[ReadReadiness, socket.socket, socket.socket, _Reader]]:
    """A running readiness set watching our end of a socket pair for one reader (with
    `early` sent by the peer before it is watched); all of it ended and closed after."""
    readiness = ReadReadiness()
    ours, theirs = _pair()
    if early:
        theirs.send(early)
    reader = _Reader()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(readiness.run)
            readiness.watch(ours.fileno(), reader)
            yield readiness, ours, theirs, reader
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()


async def test_waiting_reader_wakes_when_bytes_arrive() -> None:
    async with _watched() as (readiness, ours, theirs, reader), trio.open_nursery() as nursery:
        woken: list[bytes] = []

        async def read() -> None:
            await readiness.wait(reader)
            woken.append(ours.recv(100))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert reader.read_task is not None and not woken
        theirs.send(b"hello")
        with trio.fail_after(5):
            while not woken:
                await trio.sleep(0.001)
        assert woken == [b"hello"]
        assert reader.read_task is None and not reader.readable


async def test_event_while_not_waiting_is_kept() -> None:
    async with _watched() as (readiness, ours, theirs, reader):
        theirs.send(b"early")  # before anyone waits: edge-triggered, so it must be kept
        await trio.testing.wait_all_tasks_blocked()
        assert reader.readable
        with trio.fail_after(5):
            await readiness.wait(reader)  # at once
        assert not reader.readable
        assert ours.recv(100) == b"early"
        # Nothing more arrived: the next wait blocks until something does.
        with trio.move_on_after(0.05) as idle:
            await readiness.wait(reader)
        assert idle.cancelled_caught and reader.read_task is None


async def test_bytes_present_at_registration_are_reported() -> None:
    async with _watched(early=b"first") as (readiness, ours, _, reader):
        with trio.fail_after(5):
            await readiness.wait(reader)
        assert ours.recv(100) == b"first"


async def test_forget_leaves_a_reused_number_alone() -> None:
    readiness = ReadReadiness()
    old, old_peer = _pair()
    old_reader, new_reader = _Reader(), _Reader()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(readiness.run)
        fd = old.fileno()
        readiness.watch(fd, old_reader)
        old.close()  # closed before it was forgotten (a connection handed over)
        new, new_peer = _pair()
        if new.fileno() != fd:  # make the new socket take the old number
            new_fd = new.detach()
            new = socket.socket(fileno=os.dup2(new_fd, fd))
            os.close(new_fd)
            new.setblocking(False)
        readiness.watch(fd, new_reader)
        readiness.forget(fd, old_reader)  # must not unregister the new socket
        assert len(readiness) == 1
        new_peer.send(b"x")
        with trio.fail_after(5):
            await readiness.wait(new_reader)
        assert new.recv(10) == b"x"
        readiness.forget(fd, new_reader)
        assert len(readiness) == 0
        nursery.cancel_scope.cancel()
    new.close()
    new_peer.close()
    old_peer.close()
