"""Writing response bytes to a client socket that may take them slowly.

Shared by the HTTP/1.1 connections (`gateway.http1`) and the HTTP/2 ones handed to
hypercorn (`gateway.server`). A write is shielded from its caller's cancellation (half a
response cannot be taken back), but it ends with `trio.BrokenResourceError` when the
socket takes no byte for WRITE_TIMEOUT seconds, or when its connection is dropped: the
write registers its cancel scope as the owner's `write_scope`, which the owner cancels.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import trio

from ds_cluster.gateway.budget import WRITE_TIMEOUT

TLS_WRITE_PIECE = 256 * 1024  # under TLS, WRITE_TIMEOUT applies to each piece this large


class WriteOwner(Protocol):
    """The connection a write belongs to."""

    write_scope: trio.CancelScope | None  # the write in progress, cancelled to drop it

    @property
    def dropped(self) -> bool:
        """The connection is being dropped: a write must not wait any longer."""


def _gone() -> trio.BrokenResourceError:
    return trio.BrokenResourceError("the client took no bytes in time, or was dropped")


async def write_rest(owner: WriteOwner, fd: int, view: memoryview) -> None:
    """Write what the non-blocking socket `fd` did not take at once, as it takes it."""
    with trio.CancelScope(shield=True) as scope:
        owner.write_scope = scope
        try:
            while view:
                if owner.dropped:
                    scope.cancel()
                scope.deadline = trio.current_time() + WRITE_TIMEOUT
                await trio.lowlevel.wait_writable(fd)
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(fd, view) :]
        finally:
            owner.write_scope = None
    if scope.cancelled_caught:
        raise _gone()


async def write_tls(
    owner: WriteOwner, stream: trio.abc.SendStream, data: bytes | memoryview
) -> None:
    """Write `data` through a TLS stream, each TLS_WRITE_PIECE within WRITE_TIMEOUT (a
    cancelled TLS write breaks the stream: the connection ends)."""
    view = memoryview(data)
    with trio.CancelScope(shield=True) as scope:
        owner.write_scope = scope
        try:
            for start in range(0, len(view), TLS_WRITE_PIECE):
                scope.deadline = trio.current_time() + WRITE_TIMEOUT
                await stream.send_all(view[start : start + TLS_WRITE_PIECE])
        finally:
            owner.write_scope = None
    if scope.cancelled_caught:
        raise _gone()
