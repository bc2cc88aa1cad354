"""Client authorization, decided without I/O: who presents a token, and what it may do.

Pure functions of their inputs (the request's method, canonical stream path, its
`Authorization` header and fork source, and the time): the gateway calls `decide` for every
stream request before it reaches a shard or joins a shared live read, and renders a
`Denied` as its error. Loading and reloading the files these tables come from is
`gateway.auth_files`'s job.

Two token sources, usable together:

- static tokens (`parse_tokens`): looked up by the SHA-256 of the presented token (one
  dict probe, however many tokens there are), then compared in constant time;
- JWTs (`parse_jwt_keys`, PyJWT): an HS256 secret, an RSA / EC / Ed25519 public key in
  PEM, or a JWKS. The signature is checked against the key's own algorithms only; `exp`
  (required) and `nbf` against `now`; rights and prefixes come from the `ds_rights` (or
  `scope`) and `ds_prefixes` claims.

Rights: `read` (GET, HEAD, live reads), `write` (create, append, close), `admin` (delete,
fork; a fork also needs `read` on its source), `metrics` (GET /metrics when protected).
A prefix is a plain string prefix of the canonical stream path below /v1/stream/: `orders/`
covers `orders/2024` but not `orders` itself; `""` covers every stream.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

READ, WRITE, ADMIN, METRICS = "read", "write", "admin", "metrics"
RIGHTS = frozenset({READ, WRITE, ADMIN, METRICS})
REALM = 'Bearer realm="ds-cluster"'
MIN_TOKEN_LENGTH = 16
MIN_HMAC_KEY_BYTES = 32  # RFC 7518 3.2: a key at least as long as the hash output
MAX_TOKEN_BYTES = 8192  # a longer Authorization value is refused unread
PREFIXES_CLAIM = "ds_prefixes"
RIGHTS_CLAIM = "ds_rights"
_VERIFIED_CACHE = 4096  # verified JWTs remembered (cleared when full)
# RFC 6750 2.1 b64token: what a bearer token may be made of.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_METHOD_RIGHT = {"GET": READ, "HEAD": READ, "POST": WRITE, "PUT": WRITE, "DELETE": ADMIN}
_TOKEN_KEYS = frozenset({"name", "token", "prefixes", "rights"})


class AuthConfigError(ValueError):
    """A tokens file or JWT key that cannot be used; the message says what is wrong."""


class _InvalidToken(Exception):
    """The presented token is not valid (unknown, bad signature, expired, malformed)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token allows: `rights` on the streams under any of `prefixes`."""

    name: str
    prefixes: tuple[str, ...]
    rights: frozenset[str]
    not_before: float | None = None  # JWT `nbf`
    expires: float | None = None  # JWT `exp`

    def covers(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self.prefixes)

    def allows(self, right: str, path: str) -> bool:
        return right in self.rights and self.covers(path)


@dataclass(frozen=True, slots=True)
class Allowed:
    grant: Grant


@dataclass(frozen=True, slots=True)
class Denied:
    """A refusal: 401 (no valid token) or 403 (the token does not cover the request)."""

    status: int
    message: str
    www_authenticate: str


MISSING = Denied(401, "authorization required: send Authorization: Bearer <token>", REALM)


def _invalid(message: str) -> Denied:
    return Denied(401, message, f'{REALM}, error="invalid_token"')


def _forbidden(message: str) -> Denied:
    return Denied(403, message, f'{REALM}, error="insufficient_scope"')


def token_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenTable:
    """Static tokens by the SHA-256 of the token: a probe costs one hash and one dict
    look-up, and the match is confirmed with `hmac.compare_digest`."""

    def __init__(self, entries: Iterable[tuple[bytes, Grant]] = ()) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Grant]] = {}
        for token, grant in entries:
            self._by_digest[token_digest(token)] = (token, grant)

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: bytes) -> Grant | None:
        found = self._by_digest.get(token_digest(token))
        if found is None or not hmac.compare_digest(found[0], token):
            return None
        return found[1]


def parse_tokens(text: str | bytes) -> TokenTable:
    """The tokens file: `{"tokens": [{"name", "token", "prefixes", "rights"}, ...]}`.
    Raises AuthConfigError naming the first problem."""
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("tokens"), list):
        raise AuthConfigError('expected {"tokens": [...]}')
    entries: list[tuple[bytes, Grant]] = []
    names: set[str] = set()
    tokens: set[bytes] = set()
    for index, item in enumerate(document["tokens"]):
        where = f"tokens[{index}]"
        if not isinstance(item, dict):
            raise AuthConfigError(f"{where}: expected an object")
        unknown = set(item) - _TOKEN_KEYS
        if unknown:
            raise AuthConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise AuthConfigError(f"{where}: name must be a non-empty string")
        where = f"token {name!r}"
        if name in names:
            raise AuthConfigError(f"{where}: name given twice")
        token = item.get("token")
        if not isinstance(token, str) or not _B64TOKEN.fullmatch(token):
            raise AuthConfigError(
                f"{where}: token must be a string of letters, digits and -._~+/ (RFC 6750)"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise AuthConfigError(f"{where}: token shorter than {MIN_TOKEN_LENGTH} characters")
        raw = token.encode("ascii")
        if raw in tokens:
            raise AuthConfigError(f"{where}: the same token is given twice")
        prefixes = _prefixes(item.get("prefixes"), where)
        rights = _rights(item.get("rights"), where)
        names.add(name)
        tokens.add(raw)
        entries.append((raw, Grant(name, prefixes, rights)))
    return TokenTable(entries)


def _prefixes(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthConfigError(f"{where}: prefixes must be a list of strings")
    for prefix in value:
        if prefix.startswith("/"):
            raise AuthConfigError(
                f"{where}: prefix {prefix!r} must be relative to /v1/stream/ (no leading /)"
            )
    return tuple(value)


def _rights(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise AuthConfigError(f"{where}: rights must be a list of strings")
    unknown = set(value) - RIGHTS
    if unknown:
        raise AuthConfigError(
            f"{where}: unknown right(s) {', '.join(sorted(unknown))} "
            f"(rights: {', '.join(sorted(RIGHTS))})"
        )
    return frozenset(value)


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any  # what PyJWT verifies with: bytes (HMAC), a public key object, or a PyJWK
    algorithms: tuple[str, ...]


class JwtKeys:
    """The keys JWTs are verified with, each tied to its own algorithms (so a token cannot
    pick, say, HS256 to be checked against a public key). Keys with a `kid` (from a JWKS)
    are chosen by the token's `kid`; a token without one is tried against the single key."""

    def __init__(self, keys: Mapping[str | None, _Key]) -> None:
        self._keys = dict(keys)
        self._verified: dict[str, Grant] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, token: str) -> Grant:
        """The grant a signed, well-formed token carries (its `exp`/`nbf` still to be
        checked against the time). Raises _InvalidToken."""
        grant = self._verified.get(token)
        if grant is not None:
            return grant
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _InvalidToken("malformed token") from None
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            if len(self._keys) != 1:
                raise _InvalidToken("unknown key id")
            key = next(iter(self._keys.values()))
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=list(key.algorithms),
                # Times are checked by the caller against its `now` (this stays pure).
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise _InvalidToken(_jwt_reason(exc)) from None
        grant = _grant_from_claims(claims)
        if len(self._verified) >= _VERIFIED_CACHE:
            self._verified.clear()
        self._verified[token] = grant
        return grant


def _jwt_reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad token signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm not allowed for this key"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience not accepted"
    return "malformed token"


def _grant_from_claims(claims: dict[str, Any]) -> Grant:
    exp = claims.get("exp")
    if not _is_time(exp):
        raise _InvalidToken("token has no valid exp claim")
    nbf = claims.get("nbf")
    if nbf is not None and not _is_time(nbf):
        raise _InvalidToken("token has an invalid nbf claim")
    prefixes = claims.get(PREFIXES_CLAIM, [])
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise _InvalidToken(f"{PREFIXES_CLAIM} must be a list of strings")
    if RIGHTS_CLAIM in claims:
        rights = claims[RIGHTS_CLAIM]
        if not isinstance(rights, list) or not all(isinstance(r, str) for r in rights):
            raise _InvalidToken(f"{RIGHTS_CLAIM} must be a list of strings")
    else:
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise _InvalidToken("scope must be a string")
        rights = scope.split()
    subject = claims.get("sub")
    return Grant(
        name=f"jwt:{subject}" if isinstance(subject, str) else "jwt",
        prefixes=tuple(prefixes),
        rights=frozenset(rights) & RIGHTS,  # unknown rights grant nothing
        not_before=None if nbf is None else float(nbf),
        expires=float(exp),  # type: ignore[arg-type]  # checked by _is_time
    )


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def parse_jwt_keys(data: bytes) -> JwtKeys:
    """A JWT key file: a PEM public key (RSA: RS256/384/512; EC: ES256/384/512 by curve;
    Ed25519/Ed448: EdDSA), a JWKS (`{"keys": [...]}`) or a single JWK, or else an HS256
    secret (the file's bytes, without trailing whitespace, at least 32 of them)."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        return JwtKeys({None: _pem_key(stripped)})
    if stripped.startswith(b"{"):
        return _jwks(stripped)
    secret = data.rstrip()
    if len(secret) < MIN_HMAC_KEY_BYTES:
        raise AuthConfigError(
            f"an HS256 secret must be at least {MIN_HMAC_KEY_BYTES} bytes (got {len(secret)})"
        )
    return JwtKeys({None: _Key(secret, ("HS256",))})


def _pem_key(pem: bytes) -> _Key:
    if b"PRIVATE KEY" in pem.split(b"\n", 1)[0]:
        raise AuthConfigError("a private key: give the gateway only the public key")
    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise AuthConfigError(f"not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise AuthConfigError(f"RSA key of {key.key_size} bits: at least 2048 needed")
        return _Key(key, ("RS256", "RS384", "RS512"))
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise AuthConfigError(f"EC curve {key.curve.name} not supported")
        return _Key(key, (alg,))
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return _Key(key, ("EdDSA",))
    raise AuthConfigError(f"unsupported public key type {type(key).__name__}")


def _jwks(text: bytes) -> JwtKeys:
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise AuthConfigError("expected a JWKS or a JWK object")
    items = document.get("keys") if "keys" in document else [document]
    if not isinstance(items, list) or not items:
        raise AuthConfigError("a JWKS needs a non-empty keys list")
    keys: dict[str | None, _Key] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise AuthConfigError(f"keys[{index}]: expected an object")
        if "d" in item:
            raise AuthConfigError(f"keys[{index}]: a private key: give only public keys")
        kid = item.get("kid")
        if len(items) > 1 and not isinstance(kid, str):
            raise AuthConfigError(f"keys[{index}]: a JWKS of several keys needs a kid on each")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a too-short HMAC key is an error here
                jwk = jwt.PyJWK(item)
        except (jwt.PyJWTError, Warning, ValueError, TypeError) as exc:
            raise AuthConfigError(f"keys[{index}]: unusable key: {exc}") from None
        name = kid if isinstance(kid, str) else None
        if name in keys:
            raise AuthConfigError(f"keys[{index}]: kid {kid!r} given twice")
        keys[name] = _Key(jwk, (jwk.algorithm_name,))
    return JwtKeys(keys)


def required(method: str, path: str, fork_source: str | None) -> list[tuple[str, str]]:
    """The (right, path) pairs a request needs. A PUT with Stream-Forked-From is a fork:
    admin on the new stream and read on its source."""
    if method == "PUT" and fork_source is not None:
        return [(ADMIN, path), (READ, fork_source)]
    return [(_METHOD_RIGHT[method], path)]


class Authorizer:
    """Decides requests against static tokens and/or JWT keys (either may be None)."""

    def __init__(self, tokens: TokenTable | None, jwt_keys: JwtKeys | None) -> None:
        self.tokens = tokens
        self.jwt_keys = jwt_keys

    def authenticate(self, authorization: bytes | None, now: float) -> Grant | Denied:
        """The grant of a valid `Authorization: Bearer` token, or why there is none."""
        if authorization is None:
            return MISSING
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return MISSING  # another scheme: not an attempt at ours (RFC 6750 3.1)
        if len(token) > MAX_TOKEN_BYTES:
            return _invalid("invalid token")
        if self.tokens is not None:
            grant = self.tokens.lookup(token)
            if grant is not None:
                return grant
        if self.jwt_keys is None or token.count(b".") != 2:
            return _invalid("invalid token")
        try:
            grant = self.jwt_keys.verify(token.decode("ascii"))
        except (_InvalidToken, UnicodeDecodeError) as exc:
            reason = str(exc) if isinstance(exc, _InvalidToken) else "malformed token"
            return _invalid(f"invalid token: {reason}")
        if grant.expires is not None and now >= grant.expires:
            return _invalid("invalid token: expired")
        if grant.not_before is not None and now < grant.not_before:
            return _invalid("invalid token: not valid yet")
        return grant

    def decide(
        self,
        method: str,
        path: str,
        authorization: bytes | None,
        fork_source: str | None,
        now: float,
    ) -> Allowed | Denied:
        """Whether `method` on the canonical stream `path` may go ahead. `fork_source`: the
        canonical path a PUT's Stream-Forked-From names (None: not a fork, or a value the
        shard will refuse anyway)."""
        grant = self.authenticate(authorization, now)
        if isinstance(grant, Denied):
            return grant
        for right, target in required(method, path, fork_source):
            if not grant.allows(right, target):
                return _forbidden(f"the token does not grant {right} on {target}")
        return Allowed(grant)

    def decide_metrics(self, authorization: bytes | None, now: float) -> Allowed | Denied:
        grant = self.authenticate(authorization, now)
        if isinstance(grant, Denied):
            return grant
        if METRICS not in grant.rights:
            return _forbidden("the token does not grant metrics")
        return Allowed(grant)
