"""When the plain-TCP HTTP/1.1 connections of a server have bytes to read, kept by one task.

A connection waits for its client once per request. Through `trio.lowlevel.wait_readable`
that wait costs an `epoll_ctl` system call (trio registers the fd one-shot, so each wait
registers it again) and trio's bookkeeping around it, twice per request (the wait, and
the event that ends it). Here each connection's socket is registered once, edge-triggered,
in an epoll set of our own; `ReadReadiness.run`, one task per server, waits for that set
to be readable (one trio wait for every connection that got bytes meanwhile), and
reschedules the connections waiting (`Reader.read_task`) directly.

Edge-triggered means an event comes when bytes arrive, not while they are there. So a
reader never waits on bytes it has not tried to read: it reads until the socket says it
would block (`BlockingIOError`), and only then waits. An event for a reader that is not
waiting leaves it `readable`: its next `wait` returns at once, and the read that follows
finds the bytes (or finds none, the event having been for bytes read already; the reader
then waits again). No event is lost between a read that would block and the wait after
it: the loop runs no other task in between.

The price is one step of the task here per wake of the set, shared by every connection
that wake finds ready: it pays when many connections are busy (the load this gateway is
built for), and costs a little when a handful of them take turns, one per wake.

A woken connection first gets the chance to serve what came without its task
(`Reader.read_here`): a plain append, the most frequent request, is read, parsed and sent
on from this task, and the connection's task sleeps on (`gateway.http1`); anything else
wakes it, with what was read kept for it.

TLS connections read through their `trio.SSLStream` and are not registered here.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Awaitable
from typing import Protocol

import trio

log = logging.getLogger(__name__)

MAX_EVENTS = 1024  # events taken from the set per wake (more: the set stays readable)

_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule
_ABORTED = trio.lowlevel.Abort.SUCCEEDED
_EDGE_IN = select.EPOLLIN | select.EPOLLET


class Reader(Protocol):
    """What a connection keeps for its waits here."""

    read_task: trio.lowlevel.Task | None  # the task waiting for bytes (None: none)
    readable: bool  # an event came while nobody waited: the next wait returns at once

    def read_here(self) -> bool:
        """Bytes may have come while `read_task` waits for them: read and serve them from
        the task here when that is all they need (True: `read_task` waits on), else
        leave what was read for `read_task` (False: it is woken)."""


async def _ready() -> None:
    """An awaitable that is done at once."""


class ReadReadiness:
    """One server's registered sockets (`run` is the task that wakes their readers)."""

    __slots__ = ("_epoll", "_readers")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Reader] = {}  # fd -> the connection reading it

    def __len__(self) -> int:
        return len(self._readers)

    def watch(self, fd: int, reader: Reader) -> None:
        """Register the socket `fd` that `reader` reads (its first bytes may be there
        already: the kernel reports those too)."""
        self._readers[fd] = reader
        try:
            self._epoll.register(fd, _EDGE_IN)
        except FileExistsError:  # (a closed socket's number, still registered)
            self._epoll.modify(fd, _EDGE_IN)

    def forget(self, fd: int, reader: Reader) -> None:
        """`reader` reads `fd` no more (call it before closing the socket; a socket
        closed already, whose number another connection may have now, is left alone)."""
        if self._readers.get(fd) is not reader:
            return
        del self._readers[fd]
        with contextlib.suppress(OSError):  # closed already: the kernel dropped it
            self._epoll.unregister(fd)

    def wait(self, reader: Reader) -> Awaitable[object]:
        """Await it to return once the socket of `reader` may have bytes: at once if an
        event came since its last wait, else when one comes (cancellable). Not a
        coroutine of its own: the waiting task is stepped through one level less when
        it is woken, once per request."""
        if reader.readable:
            reader.readable = False
            return _ready()
        reader.read_task = _current_task()

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            reader.read_task = None
            return _ABORTED

        return _wait_task_rescheduled(abort)

    async def run(self) -> None:
        """Wake the readers whose sockets got bytes, until cancelled."""
        epoll = self._epoll
        readers = self._readers
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, MAX_EVENTS):
                    reader = readers.get(fd)
                    if reader is None:
                        continue
                    task = reader.read_task
                    if task is None:
                        reader.readable = True
                        continue
                    try:
                        if reader.read_here():
                            continue
                    except Exception:  # one connection's failure must never stop the rest
                        log.exception("reading for a connection failed")
                    if reader.read_task is task:  # (not woken meanwhile)
                        reader.read_task = None
                        _reschedule(task)
        finally:
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()
