"""Mutual authentication of an RPC connection: both ends prove they hold the cluster secret.

Sans-IO: the two state machines below turn received frames into frames to send and
raise AuthError when the peer fails; the RPC's state machines (`common.rpc_core`) drive
them, its transport (`common.rpc_transport`) moves the bytes. The exchange (after TCP,
or TLS, is up):

    caller -> shard   hello {role, id, nonce_c, r}
    shard  -> caller  hello {role: "shard", id, nonce_s, mac_s}
    caller -> shard   auth  {mac_c}
    shard  -> caller  ready {ring, health}

mac_s and mac_c are HMAC-SHA256 under the secret of one transcript: the direction, the
wire version, the caller's role and name, the shard id the caller expects, both nonces
and the caller's ring version. So the secret never travels; each side's nonce makes
every transcript fresh (a recorded one does not verify again); the direction label keeps
a proof from being reflected back to its sender; and a shard proves *which* shard it is:
a process on a shard's port that claims that shard's id, without the secret, is refused
before it sees a single request. The caller checks mac_s before it sends its own proof,
and the shard reveals nothing (not even its ring) before mac_c has verified.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgpack

from ds_cluster.common import wire

NONCE_BYTES = 32
_LABEL = "ds-cluster rpc auth v1"


class AuthError(Exception):
    """The peer did not prove itself (or claims to be someone else): drop the connection.

    `reason` is short and fit for a readiness report ("authentication failed")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _transcript_mac(
    secret: bytes,
    direction: str,
    role: str,
    name: str,
    shard_id: str,
    nonce_c: bytes,
    nonce_s: bytes,
    ring: int,
) -> bytes:
    """HMAC-SHA256 over an unambiguous (msgpack array) encoding of the transcript."""
    transcript = msgpack.packb(
        [
            _LABEL,
            direction,
            wire.WIRE_VERSION,
            role,
            name,
            shard_id,
            nonce_c,
            nonce_s,
            ring,
        ],
        use_bin_type=True,
    )
    return hmac.new(secret, transcript, hashlib.sha256).digest()


class ClientHandshake:
    """The caller's side: `hello()`, then `on_server_hello()`, then `on_ready()`."""

    def __init__(
        self, secret: bytes, *, role: str, name: str, shard_id: str, ring: wire.RingInfo
    ) -> None:
        self._secret = secret
        self._role = role
        self._name = name
        self._shard_id = shard_id
        self._ring = ring
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._proven = False
        self.peer_ring: wire.RingInfo | None = None  # the shard's ring, from `ready`

    def hello(self) -> wire.HelloFrame:
        return {
            "v": wire.WIRE_VERSION,
            "k": "hello",
            "role": self._role,
            "id": self._name,
            "nonce": self._nonce,
            "r": self._ring["version"],
        }

    def on_server_hello(self, frame: wire.Frame) -> wire.AuthFrame:
        """Check the shard's proof; return our `auth` frame."""
        if frame["k"] != "hello":
            raise AuthError("authentication failed", f"expected hello, got {frame['k']}")
        if frame["id"] != self._shard_id:
            raise AuthError(f"claims to be {frame['id'][:60]!r}", f"expected {self._shard_id!r}")
        mac = frame.get("mac")
        args = (
            self._role,
            self._name,
            self._shard_id,
            self._nonce,
            frame["nonce"],
            self._ring["version"],
        )
        expected = _transcript_mac(self._secret, "shard", *args)
        if mac is None or not hmac.compare_digest(mac, expected):
            raise AuthError("authentication failed", "the shard did not prove the secret")
        self._proven = True
        return {
            "v": wire.WIRE_VERSION,
            "k": "auth",
            "mac": _transcript_mac(self._secret, "caller", *args),
        }

    def on_ready(self, frame: wire.Frame) -> dict[str, str]:
        """The shard accepted us; returns the health map it sent (its ring: `peer_ring`)."""
        if frame["k"] != "ready" or not self._proven:
            raise AuthError("authentication failed", f"expected ready, got {frame['k']}")
        self.peer_ring = frame["ring"]
        return frame["health"]


class ServerHandshake:
    """The shard's side: `on_client_hello()` -> our hello, `on_auth()` -> authenticated."""

    def __init__(self, secret: bytes, *, shard_id: str, ring: wire.RingInfo) -> None:
        self._secret = secret
        self._shard_id = shard_id
        self._ring = ring
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._args: tuple[str, str, str, bytes, bytes, int] | None = None
        self.peer: str = "?"  # "role name" of the caller, for logs
        self.peer_ring_version: int | None = None
        self.authenticated = False

    def on_client_hello(self, frame: wire.Frame) -> wire.HelloFrame:
        if frame["k"] != "hello" or self._args is not None:
            raise AuthError("authentication failed", f"expected hello, got {frame['k']}")
        if frame["role"] not in ("gateway", "shard"):
            raise AuthError("authentication failed", "unknown role")
        ring = frame.get("r")
        if ring is None:
            raise AuthError("authentication failed", "no ring version in hello")
        self.peer = f"{frame['role']} {frame['id'][:60]!r}"
        self.peer_ring_version = ring
        self._args = (frame["role"], frame["id"], self._shard_id, frame["nonce"], self._nonce, ring)
        return {
            "v": wire.WIRE_VERSION,
            "k": "hello",
            "role": "shard",
            "id": self._shard_id,
            "nonce": self._nonce,
            "mac": _transcript_mac(self._secret, "shard", *self._args),
        }

    def on_auth(self, frame: wire.Frame, health: dict[str, str]) -> wire.ReadyFrame:
        """Check the caller's proof; return the `ready` frame."""
        if frame["k"] != "auth" or self._args is None:
            raise AuthError("authentication failed", f"expected auth, got {frame['k']}")
        expected = _transcript_mac(self._secret, "caller", *self._args)
        if not hmac.compare_digest(frame["mac"], expected):
            raise AuthError("authentication failed", f"{self.peer} did not prove the secret")
        self.authenticated = True
        ring: wire.RingInfo = {
            "version": self._ring["version"],
            "shards": list(self._ring["shards"]),
            "endpoints": dict(self._ring.get("endpoints", {})),
        }
        return {"v": wire.WIRE_VERSION, "k": "ready", "ring": ring, "health": dict(health)}
