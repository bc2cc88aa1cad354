"""`gateway.route.route()`: what a stream request means, decided without a socket."""

from __future__ import annotations

import pytest

from ds_cluster.gateway import route as routes
from ds_cluster.gateway.route import Route, RouteConfig, live_mode, native_kind, route

CONFIG = RouteConfig(max_body_bytes=1024)
PUBLIC = (("host", "example.com"), ("x-forwarded-proto", "https"))


def of(
    method: str,
    target: str | bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    config: RouteConfig = CONFIG,
) -> Route:
    raw = target.encode() if isinstance(target, str) else target
    return route(method, raw, headers or [], config)


@pytest.mark.parametrize(
    ("method", "target", "kind"),
    [
        ("POST", "/v1/stream/a", routes.APPEND),
        ("GET", "/v1/stream/a", routes.READ),
        ("GET", "/v1/stream/a?offset=-1", routes.READ),
        ("GET", "/v1/stream/a?offset=5&live=long-poll", routes.LONG_POLL),
        ("GET", "/v1/stream/a?offset=5&live=sse", routes.SSE),
        ("GET", "/v1/stream/a?offset=5&live=bogus", routes.READ),  # the shard refuses it
        ("HEAD", "/v1/stream/a", routes.HEAD),
        ("HEAD", "/v1/stream/a?live=sse", routes.HEAD),  # only a GET is live
        ("PUT", "/v1/stream/a", routes.CREATE),
        ("DELETE", "/v1/stream/a", routes.DELETE),
        ("OPTIONS", "/v1/stream/a", routes.PREFLIGHT),
        ("GET", "/v1/stream/__ds/jwks.json", routes.CONTROL),
        ("POST", "/v1/stream/__ds/subscriptions/s1/ack", routes.CONTROL),
        ("GET", "/v1/stream/__ds", routes.CONTROL),
        ("GET", "/healthz", routes.NOT_OURS),
        ("GET", "/v1/streams/a", routes.NOT_OURS),
    ],
)
def test_every_kind(method: str, target: str, kind: str) -> None:
    assert of(method, target).kind == kind


def test_path_query_and_method_are_kept() -> None:
    r = of("GET", "/v1/stream/a/b?offset=7&live=long-poll")
    assert (r.method, r.path, r.query) == ("GET", "a/b", b"offset=7&live=long-poll")
    assert r.status == 0 and r.message == ""


def test_a_stream_shaped_like_a_control_route_under_another_name_is_a_stream() -> None:
    assert of("POST", "/v1/stream/orders/subscriptions/x/ack").kind == routes.APPEND
    assert of("GET", "/v1/stream/__dsx").kind == routes.READ


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/v1/stream/a%20b", "a b"),
        ("/v1/stream/a%2Fb", "a/b"),  # %2F is a separator: the same stream as a/b
        ("/v1/stream/caf%C3%A9", "café"),
        ("/v1/stream/%5F%5Fds/jwks.json", "__ds/jwks.json"),
    ],
)
def test_percent_encoded_paths_are_decoded(target: str, path: str) -> None:
    assert of("GET", target).path == path


def test_an_encoded_reserved_prefix_is_a_control_route() -> None:
    assert of("GET", "/v1/stream/%5F%5Fds/jwks.json").kind == routes.CONTROL


@pytest.mark.parametrize(
    ("query", "live"),
    [
        (b"live=sse", "sse"),
        (b"offset=1&live=long-poll", "long-poll"),
        (b"live=sse&live=long-poll", "long-poll"),  # the last one wins, as at the shard
        (b"%6Cive=sse", "sse"),  # the key percent-encoded
        (b"live=long%2Dpoll", "long-poll"),  # the value percent-encoded
        (b"liv=sse", None),
        (b"", None),
        (b"offset=live", None),
    ],
)
def test_live_mode_is_read_the_shards_way(query: bytes, live: str | None) -> None:
    assert live_mode(query) == live


def test_percent_encoded_live_values_make_live_routes() -> None:
    r = of("GET", "/v1/stream/a?offset=1&live=long%2Dpoll")
    assert r.kind == routes.LONG_POLL
    assert r.query == b"offset=1&live=long%2Dpoll"  # forwarded raw: the shard parses it


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/v1/stream/", "empty stream path"),
        ("/v1/stream/a//b", "empty segment in stream path"),
        ("/v1/stream/a/", "empty segment in stream path"),
        ("/v1/stream/a/../b", "dot segment in stream path"),
        ("/v1/stream/a/%2E%2E/b", "dot segment in stream path"),
        ("/v1/stream/a%00b", "control character in stream path"),
        ("/v1/stream/%FF", "stream path is not valid UTF-8"),
        ("/v1/stream/" + "x" * 1025, "stream path too long"),
        ("/v1/stream/" + "%41" * 1025, "stream path too long"),
    ],
)
def test_bad_paths_are_refused_with_400(target: str, message: str) -> None:
    r = of("POST", target)
    assert (r.kind, r.status, r.message) == (routes.REFUSED, 400, message)


def test_a_path_at_the_size_limit_is_taken() -> None:
    assert of("GET", "/v1/stream/" + "x" * 1024).path == "x" * 1024


@pytest.mark.parametrize("method", ["PATCH", "TRACE", "CONNECT", "get", "FOO"])
def test_other_methods_get_405_with_allow(method: str) -> None:
    r = of(method, "/v1/stream/a")
    assert (r.kind, r.status) == (routes.REFUSED, 405)
    assert r.extra == ((b"allow", b"GET, HEAD, PUT, POST, DELETE, OPTIONS"),)


def test_a_bad_path_is_refused_before_a_bad_method() -> None:
    assert of("PATCH", "/v1/stream/a//b").status == 400


def test_only_protocol_headers_are_forwarded_and_never_host() -> None:
    headers = [
        (b"host", b"client.example"),
        (b"content-type", b"text/plain"),
        (b"producer-id", b"p1"),
        (b"x-custom", b"no"),
        (b"cookie", b"no"),
        (b"authorization", b"Bearer t"),
        (b"content-length", b"3"),
    ]
    r = of("POST", "/v1/stream/a", headers)
    assert r.forwarded == (("content-type", "text/plain"), ("producer-id", "p1"))
    assert r.authorization == b"Bearer t"
    assert r.declared == 3


def test_creates_carry_the_public_base_and_other_requests_do_not() -> None:
    config = RouteConfig(1024, PUBLIC)
    put = of("PUT", "/v1/stream/a", [(b"content-type", b"text/plain")], config)
    assert put.forwarded == (("content-type", "text/plain"), *PUBLIC)
    assert of("POST", "/v1/stream/a", [], config).forwarded == ()
    assert of("PUT", "/v1/stream/a").forwarded == ()  # no public base: nothing


def test_a_repeated_if_none_match_is_joined_other_repeats_are_refused() -> None:
    r = of("GET", "/v1/stream/a", [(b"if-none-match", b'"x"'), (b"if-none-match", b'"y"')])
    assert r.forwarded == (("if-none-match", '"x", "y"'),)
    twice = of("POST", "/v1/stream/a", [(b"producer-id", b"a"), (b"producer-id", b"b")])
    assert (twice.kind, twice.status, twice.message) == (
        routes.REFUSED,
        400,
        "header producer-id given twice",
    )


def test_a_non_ascii_header_value_is_refused() -> None:
    r = of("POST", "/v1/stream/a", [(b"content-type", "tëxt".encode())])
    assert (r.status, r.message) == (400, "header content-type is not ASCII")


@pytest.mark.parametrize("value", [b"abc", b"-1", b"+5", b"1_0", b"", b"1" * 20, b"0x10"])
def test_a_bad_content_length_is_refused(value: bytes) -> None:
    r = of("POST", "/v1/stream/a", [(b"content-length", value)])
    assert (r.kind, r.status, r.message) == (routes.REFUSED, 400, "bad Content-Length")


def test_a_declared_body_over_the_limit_gets_413_at_the_limit_is_taken() -> None:
    over = of("POST", "/v1/stream/a", [(b"content-length", b"1025")])
    assert (over.kind, over.status) == (routes.REFUSED, 413)
    assert over.message == "request body exceeds the limit of 1024 bytes (1 KiB)"
    assert of("POST", "/v1/stream/a", [(b"content-length", b"1024")]).kind == routes.APPEND


def test_a_repeated_authorization_is_refused_only_when_tokens_are_checked() -> None:
    headers = [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]
    assert of("GET", "/v1/stream/a", headers).authorization == b"Bearer b"
    checked = of("GET", "/v1/stream/a", headers, RouteConfig(1024, auth=True))
    assert (checked.status, checked.message) == (400, "header authorization given twice")


def test_a_preflight_is_answered_before_header_checks() -> None:
    r = of("OPTIONS", "/v1/stream/a", [(b"content-type", "é".encode())])
    assert r.kind == routes.PREFLIGHT


def test_identical_live_reads_share_a_key_different_ones_do_not() -> None:
    target = "/v1/stream/a?offset=5&live=long-poll"
    one = of("GET", target, [(b"content-type", b"x")])
    assert one.key == of("GET", target, [(b"content-type", b"x")]).key
    assert one.key != of("GET", target).key  # other forwarded headers
    assert one.key != of("GET", "/v1/stream/a?offset=6&live=long-poll").key
    assert one.key != of("GET", "/v1/stream/b?offset=5&live=long-poll").key
    hash(one.key)


@pytest.mark.parametrize(
    ("query", "shared"),
    [
        ("offset=5&live=sse", True),
        ("offset=now&live=sse", False),  # starts where the stream is when asked
        ("offset=5&live=%73se", False),  # percent-encoded: its own upstream
    ],
)
def test_sse_reads_from_now_or_percent_encoded_are_not_shared(query: str, shared: bool) -> None:
    r = of("GET", f"/v1/stream/a?{query}")
    assert r.kind == routes.SSE
    assert (r.key is not None) == shared


def test_reads_that_are_not_live_have_no_key() -> None:
    assert of("GET", "/v1/stream/a?offset=5").key is None
    assert of("POST", "/v1/stream/a").key is None


def test_fields_are_the_rpc_frame() -> None:
    r = of("POST", "/v1/stream/a?x=%C3", [(b"content-type", b"text/plain")])
    assert r.fields(b"body") == {
        "m": "POST",
        "p": "a",
        "q": "x=%C3",
        "h": (("content-type", "text/plain"),),
        "b": b"body",
    }


def test_non_latin1_query_bytes_travel_unchanged() -> None:
    r = of("GET", b"/v1/stream/a?x=\xc3\xa9")
    assert r.fields(b"")["q"].encode("latin-1") == b"x=\xc3\xa9"


@pytest.mark.parametrize(
    ("method", "target", "kind"),
    [
        ("POST", "/v1/stream/a", "answer"),
        ("GET", "/v1/stream/a?offset=1", "answer"),
        ("GET", "/v1/stream/a?offset=1&live=long-poll", "answer"),
        ("GET", "/v1/stream/a?offset=1&live=sse", "stream"),
        ("GET", "/v1/stream/__ds/jwks.json?live=sse", "answer"),
        ("GET", "/v1/stream/a?offset=%2D1", None),  # percent-encoded query: ASGI
        ("GET", "/metrics", None),
        ("PATCH", "/v1/stream/a", "answer"),  # answered 405 there
    ],
)
def test_native_kind(method: str, target: str, kind: str | None) -> None:
    assert native_kind(method, target.encode()) == kind


def test_native_kind_agrees_with_route() -> None:
    """What the native route streams is exactly what `route()` calls an SSE read."""
    for target in [
        "/v1/stream/a?live=sse",
        "/v1/stream/a?offset=1&live=sse&live=long-poll",
        "/v1/stream/a?live=long-poll&live=sse",
        "/v1/stream/a",
    ]:
        streams = native_kind("GET", target.encode()) == "stream"
        assert streams == (of("GET", target).kind == routes.SSE), target
