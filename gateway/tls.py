"""TLS for the gateway's clients: `--tls-cert FILE --tls-key FILE`, reloaded on SIGHUP.

The gateway terminates TLS itself (HTTP/1.1 and HTTP/2, chosen by ALPN) so that a cluster
can be exposed without a proxy in front. `ServerTLS` owns the certificate: `reload()`
builds a whole new `ssl.SSLContext` from the files and swaps it in only once it loaded,
so a bad new certificate (or a key that does not match it) is logged and the old one
keeps serving. `TLSListener` wraps each accepted connection with the context current at
that moment: new connections see a reloaded certificate, open ones keep theirs.

These options are the public listener's; the cluster-internal RPC links have their own
(`common/rpc_security.py`, `--rpc-tls-*`).
"""

from __future__ import annotations

import argparse
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("gateway.tls")
ALPN = ["h2", "http/1.1"]
HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to complete the TLS handshake


class TLSError(Exception):
    """The certificate or key cannot be used (one line, for stderr)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve HTTPS with this certificate chain; reloaded on SIGHUP",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        metavar="PEM",
        help="the certificate's private key (reloaded with it)",
    )


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for HTTPS clients: TLS 1.2 or later, ALPN h2 and http/1.1, no
    compression (RFC 9113 9.2)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(ALPN)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"TLS certificate {cert} / key {key}: {exc}") from None
    return context


@dataclass
class ServerTLS:
    """The certificate files and the context built from them."""

    cert: Path
    key: Path
    context: ssl.SSLContext

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerTLS | None:
        """None without TLS options; TLSError when they are incomplete or unusable."""
        cert, key = args.tls_cert, args.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise TLSError("--tls-cert and --tls-key go together")
        return cls(cert, key, server_context(cert, key))

    def reload(self) -> bool:
        """Load the files again; keep the current context when they do not load."""
        try:
            self.context = server_context(self.cert, self.key)
        except TLSError as exc:
            log.error("certificate not reloaded, the previous one stays: %s", exc)
            return False
        log.info("certificate reloaded from %s", self.cert)
        return True


class TLSListener(trio.abc.Listener[trio.SSLStream[trio.SocketStream]]):
    """trio's SSLListener, with the context read at each accept (see `ServerTLS.reload`).
    The handshake happens in the connection's own task, under HANDSHAKE_TIMEOUT."""

    def __init__(self, transport_listener: trio.SocketListener, tls: ServerTLS) -> None:
        self.transport_listener = transport_listener
        self.socket = transport_listener.socket
        self.tls = tls

    async def accept(self) -> trio.SSLStream[trio.SocketStream]:
        transport = await self.transport_listener.accept()
        return trio.SSLStream(transport, self.tls.context, server_side=True, https_compatible=True)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()
