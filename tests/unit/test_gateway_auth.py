"""The pure client authorizer (`gateway/auth.py`): token tables, JWT keys, decisions."""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ds_cluster.gateway.auth import (
    Allowed,
    AuthConfigError,
    Authorizer,
    Denied,
    parse_jwt_keys,
    parse_tokens,
)

NOW = 1_800_000_000.0
INGEST = "ingest-0123456789abcdef"
READER = "reader-0123456789abcdef"
ADMIN = "admin-0123456789abcdefgh"
SECRET = b"s" * 32


def tokens_file() -> str:
    return json.dumps(
        {
            "tokens": [
                {"name": "ingest", "token": INGEST, "prefixes": ["orders/"], "rights": ["write"]},
                {"name": "reader", "token": READER, "prefixes": ["orders/"], "rights": ["read"]},
                {"name": "ops", "token": ADMIN, "prefixes": [""], "rights": ["read", "admin"]},
            ]
        }
    )


def bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


@pytest.fixture
def authorizer() -> Authorizer:
    return Authorizer(parse_tokens(tokens_file()), parse_jwt_keys(SECRET))


def test_missing_and_other_schemes_are_401_without_error_code(authorizer: Authorizer) -> None:
    for header in (None, b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer   "):
        decision = authorizer.decide("GET", "orders/a", header, None, NOW)
        assert isinstance(decision, Denied)
        assert decision.status == 401
        assert decision.www_authenticate == 'Bearer realm="ds-cluster"'


def test_wrong_token_is_401_invalid_token(authorizer: Authorizer) -> None:
    for token in ("nope", INGEST + "x", INGEST[:-1], "a.b.c", "x" * 9000):
        decision = authorizer.decide("POST", "orders/a", bearer(token), None, NOW)
        assert isinstance(decision, Denied), token
        assert decision.status == 401
        assert 'error="invalid_token"' in decision.www_authenticate


def test_rights_per_method(authorizer: Authorizer) -> None:
    def status(method: str, token: str, path: str = "orders/a", source: str | None = None) -> int:
        decision = authorizer.decide(method, path, bearer(token), source, NOW)
        return 200 if isinstance(decision, Allowed) else decision.status

    assert status("POST", INGEST) == 200
    assert status("PUT", INGEST) == 200
    assert status("GET", INGEST) == 403  # write only
    assert status("HEAD", READER) == 200
    assert status("GET", READER) == 200
    assert status("POST", READER) == 403
    assert status("PUT", READER) == 403
    assert status("DELETE", INGEST) == 403
    assert status("DELETE", ADMIN, "anything/at/all") == 200
    assert status("GET", READER, "orders") == 403  # "orders/" does not cover "orders"
    assert status("GET", READER, "ordersx/a") == 403
    # A fork: admin on the new stream and read on its source.
    assert status("PUT", ADMIN, "orders/b", "orders/a") == 200
    assert status("PUT", INGEST, "orders/b", "orders/a") == 403


def test_fork_needs_read_on_its_source() -> None:
    entry = {"name": "f", "token": ADMIN, "prefixes": ["mine/"], "rights": ["read", "admin"]}
    table = parse_tokens(json.dumps({"tokens": [entry]}))
    authorizer = Authorizer(table, None)
    assert isinstance(authorizer.decide("PUT", "mine/f", bearer(ADMIN), "mine/s", NOW), Allowed)
    denied = authorizer.decide("PUT", "mine/f", bearer(ADMIN), "theirs/s", NOW)
    assert isinstance(denied, Denied) and denied.status == 403
    assert "read on theirs/s" in denied.message


def hs256(claims: dict, key: bytes = SECRET, **headers: str) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=headers or None)


def test_jwt_claims_exp_nbf(authorizer: Authorizer) -> None:
    good = {"exp": NOW + 60, "ds_prefixes": ["logs/"], "ds_rights": ["read", "write"]}
    assert isinstance(authorizer.decide("POST", "logs/x", bearer(hs256(good)), None, NOW), Allowed)
    forbidden = authorizer.decide("POST", "orders/x", bearer(hs256(good)), None, NOW)
    assert isinstance(forbidden, Denied) and forbidden.status == 403
    expired = authorizer.decide("GET", "logs/x", bearer(hs256(good)), None, NOW + 60)
    assert isinstance(expired, Denied) and expired.status == 401
    assert "expired" in expired.message
    early = {**good, "nbf": NOW + 10}
    assert isinstance(authorizer.decide("GET", "logs/x", bearer(hs256(early)), None, NOW), Denied)
    assert isinstance(
        authorizer.decide("GET", "logs/x", bearer(hs256(early)), None, NOW + 10), Allowed
    )


def test_jwt_refusals(authorizer: Authorizer) -> None:
    def refused(token: str) -> str:
        decision = authorizer.decide("GET", "logs/x", bearer(token), None, NOW)
        assert isinstance(decision, Denied) and decision.status == 401, token
        return decision.message

    claims = {"exp": NOW + 60, "ds_prefixes": [""], "ds_rights": ["read"]}
    assert "signature" in refused(hs256(claims, b"t" * 32))
    assert "exp" in refused(hs256({"ds_prefixes": [""], "ds_rights": ["read"]}))
    assert "ds_prefixes" in refused(hs256({**claims, "ds_prefixes": "logs/"}))
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert "not allowed" in refused(unsigned)
    assert refused("a.b.c")


def test_jwt_scope_claim_and_unknown_rights(authorizer: Authorizer) -> None:
    token = hs256({"exp": NOW + 60, "ds_prefixes": [""], "scope": "read openid superuser"})
    assert isinstance(authorizer.decide("GET", "x", bearer(token), None, NOW), Allowed)
    assert isinstance(authorizer.decide("POST", "x", bearer(token), None, NOW), Denied)


def test_metrics_right(authorizer: Authorizer) -> None:
    assert authorizer.decide_metrics(None, NOW) == authorizer.decide("GET", "a", None, None, NOW)
    denied = authorizer.decide_metrics(bearer(ADMIN), NOW)
    assert isinstance(denied, Denied) and denied.status == 403
    token = hs256({"exp": NOW + 60, "ds_rights": ["metrics"]})
    assert isinstance(authorizer.decide_metrics(bearer(token), NOW), Allowed)


def _pem(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_rs256_and_eddsa_public_keys() -> None:
    claims = {"exp": NOW + 60, "ds_prefixes": [""], "ds_rights": ["read"]}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for private, alg in ((rsa_key, "RS256"), (ed_key, "EdDSA")):
        keys = parse_jwt_keys(_pem(private.public_key()))
        authorizer = Authorizer(None, keys)
        token = jwt.encode(claims, private, algorithm=alg)
        assert isinstance(authorizer.decide("GET", "a", bearer(token), None, NOW), Allowed)
        # Algorithm confusion: an HS256 token "signed" with the public key is refused.
        forged = jwt.encode(claims, b"x" * 32, algorithm="HS256")
        assert isinstance(authorizer.decide("GET", "a", bearer(forged), None, NOW), Denied)


def test_jwks_chooses_by_kid() -> None:
    claims = {"exp": NOW + 60, "ds_prefixes": [""], "ds_rights": ["read"]}
    one, two = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(k.public_key())), "kid": kid}
            for k, kid in ((one, "one"), (two, "two"))
        ]
    }
    authorizer = Authorizer(None, parse_jwt_keys(json.dumps(jwks).encode()))
    good = jwt.encode(claims, two, algorithm="EdDSA", headers={"kid": "two"})
    assert isinstance(authorizer.decide("GET", "a", bearer(good), None, NOW), Allowed)
    wrong = jwt.encode(claims, two, algorithm="EdDSA", headers={"kid": "one"})
    assert isinstance(authorizer.decide("GET", "a", bearer(wrong), None, NOW), Denied)
    unknown = jwt.encode(claims, two, algorithm="EdDSA", headers={"kid": "three"})
    assert isinstance(authorizer.decide("GET", "a", bearer(unknown), None, NOW), Denied)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "not JSON"),
        ("[]", "expected"),
        ('{"tokens": [{"name": "a", "token": "short", "prefixes": [], "rights": []}]}', "shorter"),
        (
            '{"tokens": [{"name": "a", "token": "0123456789abcdef0", "prefixes": [""],'
            ' "rights": ["read", "fly"]}]}',
            "unknown right",
        ),
        (
            '{"tokens": [{"name": "a", "token": "0123456789abcdef0", "prefixes": ["/v1/x"],'
            ' "rights": []}]}',
            "relative",
        ),
        (
            '{"tokens": [{"name": "a", "token": "0123456789abcdef0", "prefix": [""],'
            ' "rights": []}]}',
            "unknown key",
        ),
        (
            '{"tokens": [{"name": "a", "token": "0123456789 abcdef0", "prefixes": [""],'
            ' "rights": []}]}',
            "RFC 6750",
        ),
        (
            '{"tokens": [{"name": "a", "token": "0123456789abcdef0", "prefixes": [""],'
            ' "rights": []}, {"name": "b", "token": "0123456789abcdef0", "prefixes": [""],'
            ' "rights": []}]}',
            "twice",
        ),
    ],
)
def test_bad_tokens_files(text: str, problem: str) -> None:
    with pytest.raises(AuthConfigError, match=problem):
        parse_tokens(text)


def test_bad_jwt_keys() -> None:
    with pytest.raises(AuthConfigError, match="at least 32"):
        parse_jwt_keys(b"short secret\n")
    private = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(AuthConfigError, match="private key"):
        parse_jwt_keys(private)
    with pytest.raises(AuthConfigError, match="PEM"):
        parse_jwt_keys(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")
    with pytest.raises(AuthConfigError, match="keys"):
        parse_jwt_keys(b'{"keys": []}')


def test_jwt_audience_and_jwk_without_alg() -> None:
    authorizer = Authorizer(None, parse_jwt_keys(SECRET))
    with_aud = hs256(
        {"exp": NOW + 60, "aud": "elsewhere", "ds_prefixes": [""], "ds_rights": ["read"]}
    )
    denied = authorizer.decide("GET", "a", bearer(with_aud), None, NOW)
    assert isinstance(denied, Denied) and "audience" in denied.message
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    assert "alg" not in jwk  # the key type's algorithm is used
    authorizer = Authorizer(None, parse_jwt_keys(json.dumps(jwk).encode()))
    token = jwt.encode(
        {"exp": NOW + 60, "ds_prefixes": [""], "ds_rights": ["read"]}, private, "RS256"
    )
    assert isinstance(authorizer.decide("GET", "a", bearer(token), None, NOW), Allowed)


def test_a_verified_jwt_is_still_checked_for_expiry_each_time() -> None:
    authorizer = Authorizer(None, parse_jwt_keys(SECRET))
    token = bearer(hs256({"exp": NOW + 60, "ds_prefixes": [""], "ds_rights": ["read"]}))
    assert isinstance(authorizer.decide("GET", "a", token, None, NOW), Allowed)
    assert isinstance(authorizer.decide("GET", "a", token, None, NOW + 61), Denied)
