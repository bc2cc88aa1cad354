"""The cluster's webhook signing key (Ed25519) and callback-token key.

Both are derived from the cluster secret (HMAC-SHA256 with a fixed label), so every shard
holds the same keys without exchanging them, a restart keeps them (the secret is
persisted: `DATA/cluster.secret`), and any shard can serve the JWK Set. The key id is
`ds_` + the key's RFC 7638 JWK thumbprint, stable for the key's lifetime. Rotating the
cluster secret rotates both keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

_SIGNING_LABEL = b"ds-cluster webhook signing key v1"
_TOKEN_LABEL = b"ds-cluster subscription tokens v1"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKeys:
    def __init__(self, secret: bytes) -> None:
        seed = hmac.new(secret, _SIGNING_LABEL, hashlib.sha256).digest()
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = b64url(public)
        thumbprint = json.dumps(
            {"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True
        )
        self.kid = "ds_" + b64url(hashlib.sha256(thumbprint.encode()).digest())
        self.jwk = {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": x,
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
        }
        self.token_key = hmac.new(secret, _TOKEN_LABEL, hashlib.sha256).digest()

    def jwks(self) -> bytes:
        return json.dumps({"keys": [self.jwk]}, separators=(",", ":")).encode()

    def signature_header(self, body: bytes, timestamp: int) -> str:
        """`Webhook-Signature`: Ed25519 over `<timestamp>.<raw body>`."""
        signature = self._private.sign(str(timestamp).encode() + b"." + body)
        return f"t={timestamp},kid={self.kid},ed25519={b64url(signature)}"
