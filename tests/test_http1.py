"""`gateway.http1` over real sockets: a gateway process in front of a fake shard, raw
HTTP/1.1 clients that send byte for byte and parse responses by their framing.

Pipelining and keep-alive across the native route and the ASGI driver, HEAD, chunked
request bodies, HTTP/1.0, each limit (head size, header count, body size, Content-Length
with Transfer-Encoding, a malformed head), early answers with the rest of the body
drained, and what is handed to hypercorn (an h2c upgrade only on a first request).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest
from support.fakeshard import ThreadedShard, threaded_shard
from support.processes import GatewayProcess, gateway_for
from test_gateway_server import Conn, behave, chunked_request, gate, request

from ds_cluster.gateway.http1 import MAX_HEAD, MAX_HEADERS

MAX_BODY = 100_000  # the gateway's --max-body-bytes here


@pytest.fixture(scope="module")
def shard() -> Iterator[ThreadedShard]:
    with threaded_shard(behave) as threaded:
        yield threaded


@pytest.fixture(scope="module")
def gateway(shard: ThreadedShard) -> Iterator[GatewayProcess]:
    with gateway_for(shard, "--max-body-bytes", str(MAX_BODY)) as gw:
        yield gw


def read_all_until_closed(conn: Conn, timeout: float = 5.0) -> bytes:
    """What is left for the client, up to the server closing the connection."""
    conn.sock.settimeout(timeout)
    data, conn.buf = conn.buf, b""
    while True:
        try:
            more = conn.sock.recv(65536)
        except ConnectionResetError:
            return data
        if not more:
            return data
        data += more


def test_pipelined_mix_answered_in_order(gateway: GatewayProcess) -> None:
    """Native answers, a HEAD, a chunked body and an ASGI route, sent in one write: each
    answered in order, then the connection serves on."""
    with Conn(gateway.port) as conn:
        conn.send(
            request("GET", "/v1/stream/echo/p1")
            + request("POST", "/v1/stream/echo/p2", body=b"body two")
            + request("HEAD", "/v1/stream/echo/p3")
            + chunked_request("/v1/stream/echo/p4", [b"four", b"-", b"parts"])
            + request("GET", "/healthz")
            + request("GET", "/v1/stream/echo/p6?x=1")
        )
        assert conn.read_response().body == b"echo/p1?"
        assert conn.read_response().body == b"body two"
        head = conn.read_response("HEAD")
        assert head.status == 200 and head.get("content-length") == str(len("echo/p3?"))
        assert conn.read_response().body == b"four-parts"
        health = conn.read_response()
        assert health.status == 200 and health.get("x-request-id")
        assert conn.read_response().body == b"echo/p6?x=1"
        assert conn.buf == b""
        assert conn.exchange("GET", "/v1/stream/echo/after").body == b"echo/after?"


def test_request_split_over_many_writes(gateway: GatewayProcess) -> None:
    """A request trickled a few bytes at a time (within the deadlines) is parsed whole."""
    data = request("POST", "/v1/stream/echo/trickle", "X-Request-Id: trickled\r\n", b"x" * 300)
    with Conn(gateway.port) as conn:
        for start in range(0, len(data), 7):
            conn.send(data[start : start + 7])
            time.sleep(0.001)
        got = conn.read_response()
        assert got.body == b"x" * 300 and got.get("x-request-id") == "trickled"


def test_request_ids_on_the_native_route(gateway: GatewayProcess) -> None:
    """The first X-Request-Id of a request is its id when usable; an unusable one gets a
    new id (a second one is never looked at); no header, a new id for each request."""
    with Conn(gateway.port) as conn:
        two = "X-Request-Id: first\r\nX-Request-Id: second\r\n"
        assert conn.exchange("GET", "/v1/stream/echo/a", two).get("x-request-id") == "first"
        bad = "X-Request-Id: has space\r\nX-Request-Id: second\r\n"
        fresh = conn.exchange("POST", "/v1/stream/echo/b", bad, b"x").get("x-request-id")
        assert fresh is not None and re.fullmatch("[0-9a-f]{16}", fresh), fresh
        ids = {conn.exchange("GET", "/v1/stream/echo/c").get("x-request-id") for _ in range(3)}
        assert len(ids) == 3 and all(re.fullmatch("[0-9a-f]{16}", i or "") for i in ids), ids


def test_http10_answered_and_closed(gateway: GatewayProcess) -> None:
    with Conn(gateway.port) as conn:
        conn.send(b"GET /v1/stream/echo/old HTTP/1.0\r\n\r\n")
        got = conn.read_response()
        assert got.body == b"echo/old?" and got.get("connection") == "close"
        conn.expect_eof(3)
    with Conn(gateway.port) as conn:  # SSE over HTTP/1.0: the ASGI driver, no chunks
        name = "h10sse"
        conn.send(f"GET /v1/stream/sse/{name}?live=sse HTTP/1.0\r\n\r\n".encode())
        head = conn.read_head()
        assert head.status == 200 and head.get("transfer-encoding") is None
        gate(name).set()
        assert read_all_until_closed(conn) == b"data: released\n\n"


def test_version_and_keep_alive_from_connection_headers(gateway: GatewayProcess) -> None:
    """HTTP/1.1 is kept alive unless `Connection: close`, with or without a Connection
    header saying keep-alive; HTTP/1.0 is closed after its answer even when it asks to be
    kept alive (`on_headers_complete` tells 1.1 apart without asking llhttp's version
    only when no Connection header came). 100-continue is only for HTTP/1.1."""
    with Conn(gateway.port) as conn:
        for headers in ("", "Connection: keep-alive\r\n", "Connection: Keep-Alive, foo\r\n"):
            got = conn.exchange("POST", "/v1/stream/echo/k", headers, b"x")
            assert got.status == 200 and got.get("connection") is None, headers
        got = conn.exchange("POST", "/v1/stream/echo/k", "Connection: close\r\n", b"x")
        assert got.get("connection") == "close"
        conn.expect_eof(3)
    for headers in (b"", b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n"):
        with Conn(gateway.port) as conn:
            conn.send(
                b"POST /v1/stream/echo/old HTTP/1.0\r\nContent-Length: 1\r\n%s\r\nx" % headers
            )
            got = conn.read_response()
            assert got.status == 200 and got.get("connection") == "close", headers
            conn.expect_eof(3)


def test_head_too_large_or_too_many_fields_is_431_and_closed(gateway: GatewayProcess) -> None:
    with Conn(gateway.port) as conn:
        conn.send(request("GET", "/v1/stream/echo/big", f"X-Big: {'b' * MAX_HEAD}\r\n"))
        data = read_all_until_closed(conn)
        assert data.startswith(b"HTTP/1.1 431 "), data[:100]
        assert data.count(b"HTTP/1.1 ") == 1 and b"connection: close" in data
    fields = "".join(f"X-F{n}: {n}\r\n" for n in range(MAX_HEADERS + 1))
    with Conn(gateway.port) as conn:
        conn.send(request("GET", "/v1/stream/echo/many", fields))
        assert read_all_until_closed(conn).startswith(b"HTTP/1.1 431 ")
    with Conn(gateway.port) as conn:  # a head that never ends is cut at MAX_HEAD too
        conn.send(b"GET /v1/stream/echo/endless HTTP/1.1\r\nX-Endless: ")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(64):
                conn.send(b"e" * 4096)
                time.sleep(0.002)
        assert read_all_until_closed(conn).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /v1/stream/echo/x HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /v1/stream/echo/x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n1\r\nz\r\n0\r\n\r\n",
        b"POST /v1/stream/echo/x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/stream/echo/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_is_400_and_closed_after_earlier_answers(
    gateway: GatewayProcess, raw: bytes
) -> None:
    """The requests before it are answered; then 400, close, and nothing after it runs."""
    with Conn(gateway.port) as conn:
        conn.send(request("GET", "/v1/stream/echo/before") + raw + request("GET", "/never"))
        assert conn.read_response().body == b"echo/before?"
        data = read_all_until_closed(conn)
        assert data.startswith(b"HTTP/1.1 400 "), data[:200]
        assert data.count(b"HTTP/1.1 ") == 1 and b"connection: close" in data


def test_body_over_the_limit_413_drained_and_kept(gateway: GatewayProcess) -> None:
    """Declared too large: 413 at its head, the body is drained, the connection serves
    on. Chunked, found too large on the way: the same."""
    body = b"z" * (MAX_BODY + 1)
    with Conn(gateway.port) as conn:
        conn.send(request("POST", "/v1/stream/echo/large", body=body))
        got = conn.read_response()
        assert got.status == 413 and b"exceeds the limit" in got.body
        assert got.get("connection") is None
        assert conn.exchange("GET", "/v1/stream/echo/next").body == b"echo/next?"
        conn.send(chunked_request("/v1/stream/echo/large", [body[:60_000], body[60_000:]]))
        assert conn.read_response().status == 413
        assert conn.exchange("GET", "/v1/stream/echo/again").body == b"echo/again?"


def test_expect_continue_over_the_limit_gets_413_without_100(gateway: GatewayProcess) -> None:
    with Conn(gateway.port) as conn:
        conn.send(
            b"POST /v1/stream/echo/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        got = conn.read_response()
        assert got.status == 413 and got.get("connection") == "close"
        conn.expect_eof(3)


def test_request_pipelined_behind_an_sse_response(gateway: GatewayProcess) -> None:
    """Sent while the SSE response streams: answered once it has ended."""
    name = "behind-sse"
    with Conn(gateway.port) as conn:
        conn.send(request("GET", f"/v1/stream/sse/{name}?live=sse"))
        assert conn.read_head().get("transfer-encoding") == "chunked"
        conn.send(request("GET", "/v1/stream/echo/queued"))
        conn.expect_silence(0.2)
        gate(name).set()
        assert conn.read_chunk() == b"data: released\n\n"
        assert conn.read_chunk() == b""
        assert conn.read_response().body == b"echo/queued?"


def test_sse_client_leaving_ends_its_response(gateway: GatewayProcess) -> None:
    """A client that closes during an SSE response: the gateway leaves the upstream and
    goes on serving others."""
    name = "leaving"
    with Conn(gateway.port) as conn:
        conn.send(request("GET", f"/v1/stream/sse/{name}?live=sse"))
        assert conn.read_head().status == 200
    gate(name).set()
    with Conn(gateway.port) as conn:
        assert conn.exchange("GET", "/v1/stream/echo/still").body == b"echo/still?"


def test_h2c_upgrade_after_a_first_request_is_served_as_http1(gateway: GatewayProcess) -> None:
    """Only a connection's first request is handed to hypercorn for h2c; a later one is
    answered over HTTP/1.1 (the Upgrade declined) and the connection serves on."""
    with Conn(gateway.port) as conn:
        assert conn.exchange("GET", "/v1/stream/echo/first").status == 200
        upgrade = (
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        )
        got = conn.exchange("GET", "/v1/stream/echo/late", upgrade)
        assert got.status == 200 and got.body == b"echo/late?"
        assert conn.exchange("GET", "/v1/stream/echo/then").body == b"echo/then?"


def test_prior_knowledge_preface_in_pieces_goes_to_hypercorn(gateway: GatewayProcess) -> None:
    """The HTTP/2 preface arriving a few bytes at a time is still recognised."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        for start in range(0, len(preface), 3):
            sock.sendall(preface[start : start + 3])
            time.sleep(0.01)
        sock.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS frame
        frame = sock.recv(9)
        assert len(frame) == 9 and frame[3] == 0x4, frame  # the server's SETTINGS
