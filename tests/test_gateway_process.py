"""The real gateway process in front of an in-test wire server standing in for a shard.

One gateway process and one fake shard (in a thread with its own trio loop) serve the
whole module; tests that need a dead or dropping shard start their own. Raw sockets are
used where an HTTP client library would normalise the request (dot segments, duplicate
headers, non-ASCII values) or where the test must hang up mid-response.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from support.fakeshard import FakeShard, Reply, ThreadedShard, threaded_shard
from support.http import parse_head
from support.processes import GatewayProcess, gateway_for

from ds_cluster.gateway.answers import body_too_large

MAX_BODY = 4096
CANCELLED: dict[str, threading.Event] = {}


def cancelled_event(path: str) -> threading.Event:
    return CANCELLED.setdefault(path, threading.Event())


async def scripted(msg: dict[str, Any], reply: Reply) -> None:
    """Behaviour chosen by the first path segment."""
    i, path = msg["i"], msg["p"]
    kind = path.split("/", 1)[0]
    if kind == "echo":
        seen = {"m": msg["m"], "p": path, "q": msg["q"], "h": msg["h"], "n": len(msg["b"])}
        headers = [["Content-Type", "application/json"], ["Stream-Next-Offset", "42"]]
        if path.endswith("/cached"):
            headers.append(["Cache-Control", "public, max-age=60"])
        if path.endswith("/sneaky"):
            headers.append(["Access-Control-Allow-Origin", "https://evil.example"])
        await reply(
            {
                "k": "res",
                "i": i,
                "s": 200,
                "h": headers,
                "b": json.dumps(seen).encode(),
                "more": False,
            }
        )
    elif kind == "sse":
        try:
            await reply(
                {
                    "k": "res",
                    "i": i,
                    "s": 200,
                    "h": [["content-type", "text/event-stream"], ["cache-control", "no-cache"]],
                    "b": b"event: data\ndata: first\n\n",
                    "more": True,
                }
            )
            for n in range(3):
                await trio.sleep(0.01)
                await reply({"k": "chunk", "i": i, "b": f"data: {n}\n\n".encode(), "more": True})
            if path.endswith("/endless"):
                await trio.sleep(math.inf)
            await reply({"k": "chunk", "i": i, "b": b"", "more": False})
        finally:
            if trio.current_effective_deadline() == -math.inf:
                cancelled_event(path).set()
    elif kind == "slow":
        try:
            await trio.sleep(math.inf)
        finally:
            cancelled_event(path).set()
    elif kind == "err":
        code = path.split("/", 2)[1]
        await reply({"k": "err", "i": i, "code": code, "msg": f"shard says {code}"})
    else:
        await reply({"k": "res", "i": i, "s": 204, "h": [], "b": b"", "more": False})


@pytest.fixture(scope="module")
def shard() -> Iterator[ThreadedShard]:
    with threaded_shard(scripted) as threaded:
        yield threaded


@pytest.fixture(scope="module")
def gateway(shard: ThreadedShard) -> Iterator[GatewayProcess]:
    with gateway_for(shard, "--max-body-bytes", str(MAX_BODY)) as gw:
        yield gw


def raw_request(port: int, request: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; parse a Content-Length response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        status_line, headers, body = parse_head(data)
        status = int(status_line.split()[1])
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def get(port: int, target: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    return raw_request(port, request.encode("latin-1"))


def assert_transport_headers(headers: Any) -> None:
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cross-origin-resource-policy"] == "cross-origin"
    assert headers["access-control-allow-origin"] == "*"
    exposed = headers["access-control-expose-headers"].lower()
    for name in (
        "stream-next-offset",
        "stream-cursor",
        "stream-up-to-date",
        "stream-closed",
        "producer-epoch",
        "producer-seq",
        "producer-expected-seq",
        "producer-received-seq",
        "etag",
    ):
        assert name in exposed


# ---------------------------------------------------------------------------------------


def test_healthz_and_readyz(gateway: GatewayProcess) -> None:
    response = httpx.get(f"{gateway.url}/healthz")
    assert response.status_code == 200
    assert_transport_headers(response.headers)
    response = httpx.get(f"{gateway.url}/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True}
    response = httpx.get(f"{gateway.url}/nope")
    assert response.status_code == 404
    assert_transport_headers(response.headers)


def test_forwarding(gateway: GatewayProcess) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/stream/echo/a%20b?offset=-1&x=%41",
        headers={
            "Content-Type": "text/plain",
            "Producer-Id": "p",
            "X-Other": "dropped",
            "Authorization": "Bearer t",
        },
        content=b"hello",
    )
    assert response.status_code == 200
    seen = response.json()
    assert seen["m"] == "POST"
    assert seen["p"] == "echo/a b"
    assert seen["q"] == "offset=-1&x=%41"
    assert sorted(seen["h"]) == [  # not the client's Host: Location uses the public base
        ["content-type", "text/plain"],
        ["producer-id", "p"],
    ]
    assert seen["n"] == 5
    assert response.headers["stream-next-offset"] == "42"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["cache-control"] == "no-store"  # shard gave none
    assert_transport_headers(response.headers)

    response = httpx.get(f"{gateway.url}/v1/stream/echo/cached")
    assert response.headers["cache-control"] == "public, max-age=60"  # shard's wins

    response = httpx.get(f"{gateway.url}/v1/stream/echo/sneaky")
    assert response.headers.get_list("access-control-allow-origin") == ["*"]

    response = httpx.head(f"{gateway.url}/v1/stream/echo/x")
    assert response.status_code == 200 and response.content == b""
    assert_transport_headers(response.headers)

    response = httpx.delete(f"{gateway.url}/v1/stream/other")
    assert response.status_code == 204
    assert_transport_headers(response.headers)


def test_if_none_match_joined(gateway: GatewayProcess) -> None:
    status, _, body = get(
        gateway.port, "/v1/stream/echo/x", 'If-None-Match: "a"\r\nIf-None-Match: "b"\r\n'
    )
    assert status == 200
    assert json.loads(body)["h"] == [["if-none-match", '"a", "b"']]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/stream/",
        "/v1/stream/a//b",
        "/v1/stream/a/",
        "/v1/stream/a/../b",
        "/v1/stream/./a",
        "/v1/stream/%2e%2e/a",
        "/v1/stream/a%00b",
        "/v1/stream/a%0d%0ab",
        "/v1/stream/%ff",
        "/v1/stream/" + "a" * 1025,
    ],
)
def test_bad_paths_400(gateway: GatewayProcess, target: str) -> None:
    status, headers, body = get(gateway.port, target)
    assert status == 400, body
    assert body.strip()
    assert_transport_headers(headers)
    assert headers["cache-control"] == "no-store"


def test_method_not_allowed(gateway: GatewayProcess) -> None:
    response = httpx.request("PATCH", f"{gateway.url}/v1/stream/echo/x")
    assert response.status_code == 405
    assert "PUT" in response.headers["allow"]
    assert_transport_headers(response.headers)


@pytest.mark.parametrize(
    "extra",
    [
        "Content-Type: a\r\nContent-Type: b\r\n",
        "Producer-Id: caf\xe9\r\n",
    ],
)
def test_malformed_headers_400(gateway: GatewayProcess, extra: str) -> None:
    status, headers, body = get(gateway.port, "/v1/stream/echo/x", extra)
    assert status == 400, body
    assert_transport_headers(headers)


def test_body_limit_413(gateway: GatewayProcess) -> None:
    url = f"{gateway.url}/v1/stream/echo/x"
    ok = httpx.post(url, content=b"x" * MAX_BODY)
    assert ok.status_code == 200 and ok.json()["n"] == MAX_BODY
    # declared up front
    response = httpx.post(url, content=b"x" * (MAX_BODY + 1))
    assert response.status_code == 413
    assert_transport_headers(response.headers)

    # chunked: counted while streaming
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    response = httpx.post(url, content=chunks())
    assert response.status_code == 413
    # nothing reached the shard for those
    assert httpx.post(url, content=b"z").json()["n"] == 1


def test_413_reaches_a_client_that_sends_its_whole_body_first(gateway: GatewayProcess) -> None:
    """A client that writes its whole (too large) body before reading, as the conformance
    suite's 10 MiB append does: the gateway answers 413 at the head, then reads and drops
    the rest instead of closing on it (a close with unread bytes is a TCP reset, and the
    client's write fails before it reads the 413); the connection then serves the next
    request."""
    size = 10 * 1024 * 1024
    head = (
        f"POST /v1/stream/echo/large HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock:
        sock.sendall(head.encode("latin-1"))
        sock.sendall(bytes(size))  # before the fix: reset by the gateway (BrokenPipeError)
        reader = sock.makefile("rb")
        status_line = reader.readline()
        assert status_line.startswith(b"HTTP/1.1 413 "), status_line
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        assert reader.read(length).decode() == TOO_LARGE
        sock.sendall(
            b"POST /v1/stream/echo/after HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        assert reader.readline().startswith(b"HTTP/1.1 200 ")


def test_unknown_routes_get_plain_text_errors_not_an_html_page(gateway: GatewayProcess) -> None:
    """Outside /v1/stream/ the gateway's control app answers; its 404 and 405 are short
    plain text like every other gateway error, with the transport headers."""
    for response in (httpx.get(f"{gateway.url}/nope"), httpx.get(f"{gateway.url}/v1/streams")):
        assert response.status_code == 404
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert "<" not in response.text and "/v1/stream/" in response.text
        assert response.headers["cache-control"] == "no-store"
        assert_transport_headers(response.headers)
    response = httpx.post(f"{gateway.url}/healthz")
    assert response.status_code == 405
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == "method not allowed\n"
    assert "GET" in response.headers["allow"]


TOO_LARGE = "request body exceeds the limit of 4096 bytes (4 KiB)\n"


def test_413_states_the_limit(gateway: GatewayProcess) -> None:
    """Declared up front, counted while a chunked body streams (HTTP/1.1, native route),
    and over HTTP/2 (the ASGI route): the 413 says what the limit is."""
    assert MAX_BODY == 4096
    url = f"{gateway.url}/v1/stream/echo/limit"
    declared = httpx.post(url, content=b"x" * (MAX_BODY + 1))
    chunked = httpx.post(url, content=iter([b"y" * 1000] * 10))
    with httpx.Client(http1=False, http2=True) as h2:
        over_h2 = h2.post(url, content=b"z" * (MAX_BODY + 1))
        assert over_h2.http_version == "HTTP/2"
    for response in (declared, chunked, over_h2):
        assert response.status_code == 413
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.text == TOO_LARGE


def test_413_message_names_the_limit_in_bytes_and_units() -> None:
    assert body_too_large(64 * 1024 * 1024) == (
        "request body exceeds the limit of 67108864 bytes (64 MiB)"
    )
    assert body_too_large(1 << 30) == "request body exceeds the limit of 1073741824 bytes (1 GiB)"
    assert body_too_large(1000) == "request body exceeds the limit of 1000 bytes"


def test_options_preflight(gateway: GatewayProcess) -> None:
    response = httpx.options(
        f"{gateway.url}/v1/stream/any/thing",
        headers={
            "Origin": "https://example.com",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type, if-none-match, producer-id",
        },
    )
    assert response.status_code in (200, 204)
    assert_transport_headers(response.headers)
    allowed = response.headers["access-control-allow-headers"].lower()
    for name in ("content-type", "if-none-match", "producer-id", "stream-seq", "stream-ttl"):
        assert name in allowed
    methods = response.headers["access-control-allow-methods"]
    for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
        assert method in methods


@pytest.mark.parametrize(
    ("code", "status"),
    # misdirected: retried on the ring's owner for a while, then 503 (never a 421)
    [("bad_request", 400), ("misdirected", 503), ("unavailable", 503), ("internal", 500)],
)
def test_shard_errors(gateway: GatewayProcess, code: str, status: int) -> None:
    response = httpx.get(f"{gateway.url}/v1/stream/err/{code}")
    assert response.status_code == status
    assert f"shard says {code}" in response.text
    assert_transport_headers(response.headers)
    if status == 503:
        assert response.headers["retry-after"] == "1"


def test_sse_streams(gateway: GatewayProcess) -> None:
    received = []
    with httpx.stream("GET", f"{gateway.url}/v1/stream/sse/finite?live=sse") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-length" not in response.headers
        assert response.headers["cache-control"] == "no-cache"
        assert_transport_headers(response.headers)
        for chunk in response.iter_raw():
            received.append(chunk)
    body = b"".join(received)
    assert body == b"event: data\ndata: first\n\ndata: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_sse_client_disconnect_cancels_on_shard(gateway: GatewayProcess) -> None:
    path = "sse/endless"
    request = f"GET /v1/stream/{path}?live=sse HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"data: 2" not in data:
            data += sock.recv(65536)
    assert cancelled_event(path).wait(5), "shard never saw the cancel"


def test_slow_response_client_disconnect_cancels(gateway: GatewayProcess) -> None:
    path = "slow/longpoll"
    request = f"GET /v1/stream/{path}?live=long-poll HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(request)
        time.sleep(0.3)  # past the gateway's quick path: now it watches the client
    assert cancelled_event(path).wait(5), "shard never saw the cancel"


def test_no_shard_listening_503() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gw = GatewayProcess(f"s1=127.0.0.1:{port}")
    try:
        ready = gw.wait_ready(expect=503, timeout=1)
        assert ready.status_code == 503
        assert ready.json()["disconnected"] == ["s1"]
        started = time.monotonic()
        response = httpx.put(f"{gw.url}/v1/stream/a", content=b"x")
        assert time.monotonic() - started < 1.0  # immediately, not after a timeout
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert_transport_headers(response.headers)
    finally:
        assert gw.stop() == 0


async def test_shard_drop_mid_request_is_502_and_stream_ends() -> None:
    """In-flight request with unknown outcome -> 502 without Retry-After; a live SSE
    response just ends."""
    shard = FakeShard("s1", scripted)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        gw = await trio.to_thread.run_sync(GatewayProcess, f"s1=127.0.0.1:{shard.port}")
        try:
            assert (await trio.to_thread.run_sync(gw.wait_ready)).status_code == 200
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
                results: dict[str, Any] = {}

                async def slow() -> None:
                    results["slow"] = await client.post("/v1/stream/slow/append", content=b"x")

                async def sse() -> None:
                    async with client.stream("GET", "/v1/stream/sse/endless2?live=sse") as response:
                        results["sse_status"] = response.status_code
                        results["sse_body"] = b"".join([c async for c in response.aiter_raw()])

                with trio.fail_after(10):
                    async with trio.open_nursery() as inner:
                        inner.start_soon(slow)
                        inner.start_soon(sse)
                        while len(shard.requests) < 2:
                            await trio.sleep(0.01)
                        await trio.sleep(0.2)  # SSE chunks flowing, slow waiting
                        await shard.stop()
            assert results["slow"].status_code == 502
            assert "retry-after" not in results["slow"].headers
            assert results["sse_status"] == 200
            assert results["sse_body"].endswith(b"data: 2\n\n")

            # the shard comes back: the gateway reconnects by itself
            await nursery.start(shard.run)
            ready = await trio.to_thread.run_sync(gw.wait_ready)
            assert ready.status_code == 200
        finally:
            assert await trio.to_thread.run_sync(gw.stop) == 0
        nursery.cancel_scope.cancel()


def test_reuse_port_two_gateways(shard: ThreadedShard) -> None:
    first = GatewayProcess(f"s1=127.0.0.1:{shard.shard.port}", "--reuse-port")
    try:
        second = GatewayProcess(
            f"s1=127.0.0.1:{shard.shard.port}",
            "--reuse-port",
            "--listen",
            f"127.0.0.1:{first.port}",
        )
        try:
            assert second.port == first.port
            assert httpx.get(f"{first.url}/healthz").status_code == 200
        finally:
            assert second.stop() == 0
    finally:
        assert first.stop() == 0
