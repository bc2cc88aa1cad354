"""Unit tests of common/paths.py (pure)."""

from __future__ import annotations

import pytest

from ds_cluster.common.paths import MAX_PATH_BYTES, PathError, stream_path, stream_path_from_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a", "a"),
        (b"a/b/c", "a/b/c"),
        (b"my-stream_1.log", "my-stream_1.log"),
        (b"a%20b", "a b"),
        (b"a%2Fb", "a/b"),  # %2F is a separator once decoded
        (b"caf%C3%A9", "caf\u00e9"),
        (b"...", "..."),
        (b".hidden/x..y", ".hidden/x..y"),
        ("unicode/\u00e9", "unicode/\u00e9"),
        (b"a:b@c", "a:b@c"),
    ],
)
def test_valid(raw: bytes | str, expected: str) -> None:
    assert stream_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"/a", "empty segment"),
        (b"a/", "empty segment"),
        (b"a//b", "empty segment"),
        (b"a%2F", "empty segment"),
        (b".", "dot segment"),
        (b"..", "dot segment"),
        (b"a/../b", "dot segment"),
        (b"a/./b", "dot segment"),
        (b"%2e%2E", "dot segment"),
        (b"a/%2e", "dot segment"),
        (b"a%00b", "control"),
        (b"a%0Ab", "control"),
        (b"a%7F", "control"),
        (b"a%1f", "control"),
        (b"%C3%28", "UTF-8"),
        (b"%FF", "UTF-8"),
        (b"a" * (MAX_PATH_BYTES + 1), "too long"),
        (b"%41" * (MAX_PATH_BYTES + 1), "too long"),
        (b"x" * 10_000, "too long"),
    ],
)
def test_invalid(raw: bytes, message: str) -> None:
    with pytest.raises(PathError, match=message):
        stream_path(raw)


def test_limit_is_inclusive() -> None:
    assert stream_path(b"a" * MAX_PATH_BYTES) == "a" * MAX_PATH_BYTES
    assert stream_path(b"%41" * MAX_PATH_BYTES) == "A" * MAX_PATH_BYTES


def test_from_url() -> None:
    assert stream_path_from_url("/v1/stream/a/b") == "a/b"
    assert stream_path_from_url(b"/v1/stream/a%20b") == "a b"
    for bad in ("/v1/streams/a", "a/b", "/v1/stream/", "/v1/stream/a?x=1", "/v1/stream/../x"):
        with pytest.raises(PathError):
            stream_path_from_url(bad)
