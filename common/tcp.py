"""How much unsent data the kernel may hold for a socket that we write to directly.

trio's `SocketStream` sets TCP_NOTSENT_LOWAT to 16 KiB, so that an interactive writer
does not queue far ahead of the network. Our writers (the gateway's client connections,
the cluster's RPC links) write straight to the socket's file descriptor and wait with
`trio.lowlevel.wait_writable` when it takes no more. At 16 KiB a 1 MiB catch-up body
took 5-6 writes, each its own round through trio's scheduler (registering the fd, waking,
rescheduling), and reached the client in more, smaller pieces. Our own budgets already
bound what a connection may hold (`gateway.budget`, `common.rpc_transport`); the kernel
still bounds its own queue by the socket's send buffer.
"""

from __future__ import annotations

import contextlib
import socket

import trio

UNSENT_LIMIT = 1024 * 1024  # bytes not yet sent that a write may leave to the kernel


def allow_unsent(stream: trio.abc.Stream, limit: int = UNSENT_LIMIT) -> None:
    """Let the TCP socket under `stream` (itself, or under its TLS) take writes while
    fewer than `limit` of its bytes are unsent, instead of trio's 16 KiB. Any other
    stream, or a system without the option, is left as it is."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is None or not isinstance(stream, trio.SocketStream):
        return
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.IPPROTO_TCP, option, limit)
