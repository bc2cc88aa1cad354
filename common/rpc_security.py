"""What a process needs to join the cluster's RPC: the cluster secret, and optional TLS.

Shards and gateways take the same options (env variables in brackets):

  --cluster-secret-file FILE  [DS_CLUSTER_SECRET_FILE]  a file holding the secret, mode
                              0600 or stricter (a group- or world-readable secret is no
                              secret); or the secret itself in DS_CLUSTER_SECRET, as a
                              Kubernetes Secret is often injected. At least 32 bytes.
  --rpc-tls-cert/-key/-ca     [DS_RPC_TLS_CERT/_KEY/_CA]  TLS on the RPC links: a shard
                              serves with cert+key (and requires a client certificate
                              signed by the CA when a CA is given); callers verify the
                              shard against the CA and present cert+key when given.

`ds-cluster up` creates `DATA/cluster.secret` and passes it to every child. Without a
secret a shard or gateway refuses to start: an RPC port that anyone can drive would hand
every stream to whoever reaches it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MIN_SECRET_BYTES = 32
SECRET_FILE_NAME = "cluster.secret"


class SecurityError(Exception):
    """The process cannot join the cluster as configured (one line, for stderr)."""


@dataclass(frozen=True)
class RpcSecurity:
    secret: bytes
    server_ssl: ssl.SSLContext | None = None  # a shard's listener
    client_ssl: ssl.SSLContext | None = None  # connections to shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-secret-file",
        type=Path,
        metavar="FILE",
        help="file with the cluster secret (env DS_CLUSTER_SECRET_FILE or DS_CLUSTER_SECRET)",
    )
    parser.add_argument("--rpc-tls-cert", type=Path, metavar="PEM", help="TLS certificate")
    parser.add_argument("--rpc-tls-key", type=Path, metavar="PEM", help="TLS private key")
    parser.add_argument("--rpc-tls-ca", type=Path, metavar="PEM", help="CA to verify peers")


def from_args(
    args: argparse.Namespace, *, server: bool, environ: Mapping[str, str] = os.environ
) -> RpcSecurity:
    """The secret and TLS contexts from the options, else the environment.

    `server`: whether this process also listens for RPC (a shard)."""
    secret = _secret(args.cluster_secret_file, environ)
    cert = args.rpc_tls_cert or _env_path(environ, "DS_RPC_TLS_CERT")
    key = args.rpc_tls_key or _env_path(environ, "DS_RPC_TLS_KEY")
    ca = args.rpc_tls_ca or _env_path(environ, "DS_RPC_TLS_CA")
    if cert is None and key is None and ca is None:
        return RpcSecurity(secret)
    if (cert is None) != (key is None):
        raise SecurityError("--rpc-tls-cert and --rpc-tls-key go together")
    try:
        server_ssl = None
        if server:
            if cert is None or key is None:
                raise SecurityError("TLS on a shard needs --rpc-tls-cert and --rpc-tls-key")
            server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_ssl.load_cert_chain(cert, key)
            if ca is not None:
                server_ssl.load_verify_locations(ca)
                server_ssl.verify_mode = ssl.CERT_REQUIRED
        client_ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert is not None and key is not None:
            client_ssl.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityError(f"cannot load the RPC TLS files: {exc}") from None
    return RpcSecurity(secret, server_ssl, client_ssl)


def _env_path(environ: Mapping[str, str], name: str) -> Path | None:
    value = environ.get(name, "")
    return Path(value) if value else None


def _secret(path: Path | None, environ: Mapping[str, str]) -> bytes:
    path = path or _env_path(environ, "DS_CLUSTER_SECRET_FILE")
    if path is not None:
        return read_secret_file(path)
    value = environ.get("DS_CLUSTER_SECRET", "").strip().encode()
    if not value:
        raise SecurityError(
            "no cluster secret: pass --cluster-secret-file FILE or set "
            "DS_CLUSTER_SECRET_FILE / DS_CLUSTER_SECRET (`ds-cluster up` makes one)"
        )
    if len(value) < MIN_SECRET_BYTES:
        raise SecurityError(f"DS_CLUSTER_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
    return value


def read_secret_file(path: Path) -> bytes:
    """The secret in `path` (surrounding whitespace stripped), checked for mode and size."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            value = file.read(64 * 1024).strip()
    except OSError as exc:
        raise SecurityError(f"cannot read the cluster secret file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"the cluster secret file {path} is accessible to group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    if len(value) < MIN_SECRET_BYTES:
        raise SecurityError(
            f"the cluster secret file {path} holds fewer than {MIN_SECRET_BYTES} bytes"
        )
    return value


def ensure_secret_file(path: Path) -> Path:
    """Create `path` with a fresh secret (32 random bytes as hex, mode 0600) if missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32) + "\n")
    return path
