"""Which reserved routes carry their own credentials, and what CORS lets a browser see."""

from __future__ import annotations

import pytest

from ds_cluster.gateway.headers import PREFLIGHT, TRANSPORT
from ds_cluster.gateway.reserved import own_credentials


@pytest.mark.parametrize("action", ["callback", "ack", "release"])
def test_subscription_token_posts_carry_their_own_credentials(action: str) -> None:
    assert own_credentials("POST", f"__ds/subscriptions/abc/{action}")
    assert not own_credentials("PUT", f"__ds/subscriptions/abc/{action}")
    assert not own_credentials("GET", f"__ds/subscriptions/abc/{action}")


@pytest.mark.parametrize("root", ["orders", "__dsx", "", "__DS"])
@pytest.mark.parametrize("action", ["callback", "ack", "release"])
def test_a_path_merely_shaped_like_one_does_not(root: str, action: str) -> None:
    """Only `__ds` itself: a stream at `orders/subscriptions/x/ack` needs a client token."""
    assert not own_credentials("POST", f"{root}/subscriptions/abc/{action}")


def test_the_jwk_set_is_open_for_reading_only() -> None:
    assert own_credentials("GET", "__ds/jwks.json")
    assert own_credentials("HEAD", "__ds/jwks.json")
    assert not own_credentials("POST", "__ds/jwks.json")
    assert not own_credentials("GET", "orders/jwks.json")
    assert not own_credentials("POST", "__ds/subscriptions/abc")
    assert not own_credentials("POST", "__ds/subscriptions/abc/other")


def _header(pairs: tuple[tuple[bytes, bytes], ...], name: bytes) -> list[str]:
    values = [value for key, value in pairs if key == name]
    assert len(values) == 1, name
    return [item.strip().lower() for item in values[0].decode().split(",")]


def test_a_browser_can_read_and_send_the_request_id() -> None:
    assert "x-request-id" in _header(TRANSPORT, b"access-control-expose-headers")
    assert "www-authenticate" in _header(TRANSPORT, b"access-control-expose-headers")
    allowed = _header(PREFLIGHT, b"access-control-allow-headers")
    assert "x-request-id" in allowed and "authorization" in allowed
