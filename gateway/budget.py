"""Budgets for response bytes the gateway holds for clients that have not taken them yet.

A client that stops reading must not make the gateway hold its output without bound:
every byte queued for a client (an SSE reader's backlog, an HTTP/2 stream's send buffer,
a socket write in progress) is counted against its connection's budget and against the
process-wide one. A connection that asks to queue more while over either budget is
dropped: its responses end (SSE readers resume from their last offset) and what it held
is released. One piece of output is always admitted to an empty connection, so a single
large answer is never refused for its size (it is already in memory when it is queued).

Counting is two additions per piece queued and two subtractions per piece written.
"""

from __future__ import annotations

MAX_CONNECTION_OUTPUT = 8 * 1024 * 1024  # bytes one connection may have queued
MAX_PROCESS_OUTPUT = 256 * 1024 * 1024  # bytes all connections together may have queued
MAX_BEHIND = 1024 * 1024  # SSE bytes one reader may lag before it is dropped
WRITE_TIMEOUT = 30.0  # seconds a socket may take no bytes while we have some for it
# Unread bytes of one streamed shard call: SSE upstreams take every chunk as it comes
# (`gateway.fanout`), so only a stalled event loop lets this fill; one chunk is at most
# about a read's worth (1 MiB) of events.
RPC_MAX_BUFFERED = 4 * 1024 * 1024
OUTPUT_STATE = "ds.output"  # the connection's ConnectionOutput in an ASGI scope's state


class OutputBudget:
    """The process-wide count of queued response bytes."""

    __slots__ = ("connection_limit", "held", "limit")

    def __init__(
        self, limit: int = MAX_PROCESS_OUTPUT, connection_limit: int = MAX_CONNECTION_OUTPUT
    ) -> None:
        self.limit = limit
        self.connection_limit = connection_limit
        self.held = 0

    def connection(self) -> ConnectionOutput:
        return ConnectionOutput(self)


class ConnectionOutput:
    """One connection's queued response bytes, part of an `OutputBudget`."""

    __slots__ = ("held", "process")

    def __init__(self, process: OutputBudget) -> None:
        self.process = process
        self.held = 0

    def admit(self, size: int) -> bool:
        """Count `size` more bytes; False (nothing counted) when the connection or the
        process is already over its budget: the caller drops the connection."""
        process = self.process
        if self.held and (self.held > process.connection_limit or process.held > process.limit):
            return False
        self.held += size
        process.held += size
        return True

    def release(self, size: int) -> None:
        """`size` counted bytes were written (or discarded)."""
        size = min(size, self.held)
        self.held -= size
        self.process.held -= size

    def close(self) -> None:
        """The connection is gone: whatever it still counted is released."""
        self.process.held -= self.held
        self.held = 0


NO_LIMIT = 1 << 62  # bytes: more than any process could ever hold
UNLIMITED = OutputBudget(limit=NO_LIMIT, connection_limit=NO_LIMIT)
