"""Appends answered where the shard's answer arrives (`gateway.http1`, `_send_on`).

A plain append on a keep-alive connection is sent to its shard without its connection's
task awaiting the answer: the shard connection's reader writes it. These tests drive the
edges of that path over real sockets, a gateway process in front of a fake shard: a
client that leaves first, appends pipelined behind one in flight, the shard lost with
appends in flight, answers larger than the socket takes, a ring change retried, errors,
`Connection: close`, and the gateway stopping with an append in flight.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from support.fakeshard import FakeShard, Reply, ThreadedShard, threaded_shard
from support.processes import GatewayProcess, gateway_for
from test_gateway_server import Conn, request

_MISDIRECTED_ONCE: set[str] = set()  # paths answered `err misdirected` once already


async def scripted(msg: dict[str, Any], reply: Reply) -> None:
    i, path = msg["i"], msg["p"]
    kind, _, arg = path.partition("/")

    async def answer(status: int, body: bytes) -> None:
        headers = [["content-type", "application/octet-stream"]]
        await reply({"k": "res", "i": i, "s": status, "h": headers, "b": body, "more": False})

    if kind == "echo":  # the request's body
        await answer(200, msg["b"])
    elif kind == "fields":  # the request's own items as the shard decoded them
        items = [msg["m"], msg["p"], msg["q"], msg["h"], msg.get("t", b"").hex(), len(msg["b"])]
        await answer(200, json.dumps(items).encode())
    elif kind == "delay":  # delay/SECONDS/...: the body, after a while
        await trio.sleep(float(arg.split("/")[0]))
        await answer(200, msg["b"])
    elif kind == "big":  # big/N/...: N bytes
        await answer(200, b"b" * int(arg.split("/")[0]))
    elif kind == "hold":  # never answered
        await trio.sleep(float("inf"))
    elif kind == "err":  # err/CODE: the shard refuses
        code = arg.split("/")[0]
        await reply({"k": "err", "i": i, "code": code, "msg": f"shard says {code}"})
    elif kind == "misdirect":  # `err misdirected` the first time, then the body
        if path not in _MISDIRECTED_ONCE:
            _MISDIRECTED_ONCE.add(path)
            await reply({"k": "err", "i": i, "code": "misdirected", "msg": "not mine", "a": {}})
            return
        await answer(200, msg["b"])
    else:
        await reply({"k": "res", "i": i, "s": 204, "h": [], "b": b"", "more": False})


@pytest.fixture(scope="module")
def shard() -> Iterator[ThreadedShard]:
    with threaded_shard(scripted) as threaded:
        yield threaded


@pytest.fixture(scope="module")
def gateway(shard: ThreadedShard) -> Iterator[GatewayProcess]:
    with gateway_for(shard, "--access-log") as gw:
        yield gw


def post(target: str, body: bytes, headers: str = "") -> bytes:
    return request("POST", target, headers, body)


def test_appends_on_one_connection_in_turn(gateway: GatewayProcess) -> None:
    """Appends one after the other on a kept connection: each answered, with its own
    request id (the client's when it gave one) and the transport headers."""
    with Conn(gateway.port) as conn:
        for n in range(20):
            conn.send(post(f"/v1/stream/echo/a{n}", b"body %d" % n, f"X-Request-Id: rq-{n}\r\n"))
            response = conn.read_response()
            assert response.status == 200
            assert response.body == b"body %d" % n
            assert response.get("x-request-id") == f"rq-{n}"
            assert response.get("x-content-type-options") == "nosniff"
            assert response.get("connection") is None
    deadline = time.monotonic() + 5
    while not any("rq-19" in line for line in gateway.lines):
        assert time.monotonic() < deadline, "no access log line for the last append"
        time.sleep(0.05)


def test_appends_of_several_routes_reach_the_shard_whole(gateway: GatewayProcess) -> None:
    """Appends of different streams, queries and forwarded headers, interleaved on one
    connection and each sent twice (the second time the route's request head is packed
    already, `wire.pack_http_head`): the shard decodes each with its own method, path,
    query, headers and body, whatever its size (below and above bin 8's and the raw
    body's sizes)."""
    kinds = [
        ("/v1/stream/fields/a", "Content-Type: text/plain\r\n", 1),
        ("/v1/stream/fields/b?x=1", "Content-Type: application/json\r\n", 255),
        ("/v1/stream/fields/a", "Content-Type: application/octet-stream\r\n", 256),
        ("/v1/stream/fields/a", "Producer-Id: p\r\nProducer-Epoch: 0\r\nProducer-Seq: 3\r\n", 0),
        ("/v1/stream/fields/%C3%A9t%C3%A9", "Stream-Seq: 0007\r\n", 20_000),
    ]
    expected = []
    for target, headers, size in kinds:
        path, _, query = target.partition("?")
        sent = {
            line.split(": ")[0].lower(): line.split(": ")[1]
            for line in headers.split("\r\n")
            if line
        }
        expected.append(
            (path.removeprefix("/v1/stream/").replace("%C3%A9", "\u00e9"), query, sent, size)
        )
    with Conn(gateway.port) as conn:
        for _ in range(2):
            for (target, headers, size), (path, query, sent, length) in zip(
                kinds, expected, strict=True
            ):
                conn.send(post(target, b"z" * size, headers))
                response = conn.read_response()
                assert response.status == 200, response.body
                method, got_path, got_query, got_headers, token, got_length = json.loads(
                    response.body
                )
                assert (method, got_path, got_query, token) == ("POST", path, query, "")
                assert got_length == length
                assert {name: value for name, value in got_headers} == sent


def test_pipelined_appends_answered_in_order(gateway: GatewayProcess) -> None:
    """Appends sent in one write, the first slow: answered in the order sent."""
    with Conn(gateway.port) as conn:
        conn.send(
            post("/v1/stream/delay/0.3/p1", b"one")
            + post("/v1/stream/echo/p2", b"two")
            + post("/v1/stream/echo/p3", b"three")
        )
        assert [conn.read_response().body for _ in range(3)] == [b"one", b"two", b"three"]
        assert conn.buf == b""
        assert conn.exchange("POST", "/v1/stream/echo/after", body=b"four").body == b"four"


def test_append_pipelined_while_one_is_in_flight(gateway: GatewayProcess) -> None:
    """A request that arrives while an append is in flight (its answer not yet come) is
    answered after it: a second append, then a GET, then a head sent in pieces."""
    with Conn(gateway.port) as conn:
        conn.send(post("/v1/stream/delay/0.4/q1", b"first"))
        time.sleep(0.1)
        conn.send(post("/v1/stream/echo/q2", b"second"))
        time.sleep(0.05)
        conn.send(request("GET", "/healthz"))
        assert conn.read_response().body == b"first"
        assert conn.read_response().body == b"second"
        assert conn.read_response().status == 200
        conn.send(post("/v1/stream/delay/0.3/q3", b"third"))
        time.sleep(0.1)
        whole = post("/v1/stream/echo/q4", b"fourth")
        conn.send(whole[:10])  # a head begun while the append is in flight
        time.sleep(0.05)
        conn.send(whole[10:])
        assert conn.read_response().body == b"third"
        assert conn.read_response().body == b"fourth"


def test_client_leaving_before_its_answer(gateway: GatewayProcess, shard: ThreadedShard) -> None:
    """A client that closes (or resets) while its append is in flight: the append still
    reaches the shard, nothing is written to a socket of another client, and the gateway
    serves on."""
    before = len(shard.shard.requests)
    for how in ("close", "reset"):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        sock.sendall(post(f"/v1/stream/delay/0.3/gone-{how}", b"x"))
        time.sleep(0.05)
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    # Connections opened meanwhile (maybe given the numbers of those closed) get only
    # their own answers.
    with Conn(gateway.port) as one, Conn(gateway.port) as two:
        for n in range(10):
            one.send(post(f"/v1/stream/echo/one{n}", b"one %d" % n))
            two.send(post(f"/v1/stream/echo/two{n}", b"two %d" % n))
            assert one.read_response().body == b"one %d" % n
            assert two.read_response().body == b"two %d" % n
        time.sleep(0.5)  # the abandoned answers have arrived by now
        for conn, name in ((one, b"one"), (two, b"two")):
            assert conn.exchange("POST", "/v1/stream/echo/z", body=name).body == name
            assert conn.buf == b""
    paths = [m["p"] for m in shard.shard.requests[before:]]
    assert "delay/0.3/gone-close" in paths and "delay/0.3/gone-reset" in paths


def test_answer_larger_than_the_socket_takes(gateway: GatewayProcess) -> None:
    """An answer the client's socket cannot take at once (it reads nothing for a while):
    the rest is written as the client reads, and the connection serves on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", gateway.port))
    sock.settimeout(5)
    conn = Conn.__new__(Conn)
    conn.sock, conn.buf = sock, b""
    with conn:
        for size in (60_000, 200_000):
            conn.send(post(f"/v1/stream/big/{size}/x", b"x"))
            time.sleep(0.3)  # the gateway has written what the socket took
            response = conn.read_response()
            assert response.status == 200
            assert response.body == b"b" * size
        conn.send(post("/v1/stream/echo/after-big", b"small"))
        conn.send(post("/v1/stream/big/60000/y", b"x") + post("/v1/stream/echo/z", b"z"))
        assert conn.read_response().body == b"small"
        assert conn.read_response().body == b"b" * 60_000
        assert conn.read_response().body == b"z"


def test_connection_close_on_an_append(gateway: GatewayProcess) -> None:
    """`Connection: close` on an append (and HTTP/1.0): answered, marked, then closed."""
    with Conn(gateway.port) as conn:
        conn.send(post("/v1/stream/echo/c1", b"last", "Connection: close\r\n"))
        response = conn.read_response()
        assert response.body == b"last" and response.get("connection") == "close"
        assert conn.expect_eof(5) < 5
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/stream/echo/c2 HTTP/1.0\r\nContent-Length: 3\r\n\r\nold")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nold")


def test_shard_errors_and_a_ring_change(gateway: GatewayProcess) -> None:
    """What the shard refuses is answered as before (503 + Retry-After where it did not
    run, 400 passed on), and a ring change on the way is retried."""
    with Conn(gateway.port) as conn:
        response = conn.exchange("POST", "/v1/stream/err/unavailable/e1", body=b"x")
        assert response.status == 503 and response.get("retry-after") == "1"
        response = conn.exchange("POST", "/v1/stream/err/bad_request/e2", body=b"x")
        assert response.status == 400 and b"shard says bad_request" in response.body
        response = conn.exchange("POST", "/v1/stream/misdirect/m1", body=b"retried")
        assert response.status == 200 and response.body == b"retried"
        assert conn.exchange("POST", "/v1/stream/echo/e3", body=b"ok").body == b"ok"


def test_shard_lost_with_appends_in_flight() -> None:
    """The shard goes away while appends wait for it: each client gets 502 (the shard
    may have applied it), never a hang; later appends 503 with Retry-After."""
    threaded = ThreadedShard(FakeShard("s1", scripted))
    threaded.start()
    stopped = False
    try:
        with gateway_for(threaded) as gw:
            conns = [Conn(gw.port) for _ in range(8)]
            try:
                for n, conn in enumerate(conns):
                    conn.send(post(f"/v1/stream/hold/h{n}", b"x"))
                deadline = time.monotonic() + 5
                while len(threaded.shard.requests) < len(conns):
                    assert time.monotonic() < deadline, "the appends never reached the shard"
                    time.sleep(0.02)
                threaded.stop()
                stopped = True
                for conn in conns:
                    response = conn.read_response()
                    assert response.status == 502, response.raw
                    assert response.get("retry-after") is None
                response = conns[0].exchange("POST", "/v1/stream/echo/later", body=b"x")
                assert response.status == 503 and response.get("retry-after") == "1"
            finally:
                for conn in conns:
                    conn.sock.close()
    finally:
        if not stopped:
            threaded.stop()


def test_sigterm_with_an_append_in_flight(shard: ThreadedShard) -> None:
    """The gateway stops while an append waits for its shard: the append is answered in
    full, with `Connection: close`, and its connection closed after it; an idle one
    closes at once."""
    gw = GatewayProcess(f"s1=127.0.0.1:{shard.shard.port}", "--graceful-timeout", "3")
    try:
        assert gw.wait_ready().status_code == 200
        with Conn(gw.port) as idle, Conn(gw.port) as busy:
            assert idle.exchange("POST", "/v1/stream/echo/idle", body=b"i").body == b"i"
            assert busy.exchange("POST", "/v1/stream/echo/before", body=b"b").body == b"b"
            busy.send(post("/v1/stream/delay/0.8/stopping", b"in flight"))
            deadline = time.monotonic() + 5
            while not any(m["p"] == "delay/0.8/stopping" for m in list(shard.shard.requests)):
                assert time.monotonic() < deadline, "the append never reached the shard"
                time.sleep(0.02)
            gw.proc.send_signal(signal.SIGTERM)
            assert idle.expect_eof(3) < 1.5
            response = busy.read_response()
            assert response.status == 200 and response.body == b"in flight"
            assert response.get("connection") == "close"
            busy.expect_eof(2)
        assert gw.proc.wait(10) == 0, "".join(gw.lines[-30:])
    finally:
        if gw.proc.poll() is None:
            gw.stop()


def test_what_comes_while_a_kept_connection_waits(gateway: GatewayProcess) -> None:
    """Once a connection has been served, what its client sends next is read by the
    server's readiness task (`Http1Connection.read_here`): a whole plain append is sent
    on from there, anything else goes to the connection's task as it came. Each kind is
    answered as it always was, in order: a head and a body in pieces, appends pipelined
    in one write, a GET, a body larger than one read, Expect: 100-continue,
    `Connection: close`, and the client closing."""
    with Conn(gateway.port) as conn:
        assert conn.exchange("POST", "/v1/stream/echo/w0", body=b"first").body == b"first"
        whole = post("/v1/stream/echo/w1", b"in pieces")
        head_end = whole.index(b"\r\n\r\n") + 4
        for piece in (whole[:7], whole[7:head_end], whole[head_end:]):
            conn.send(piece)  # a head begun, a head complete without its body, the body
            time.sleep(0.05)
        assert conn.read_response().body == b"in pieces"
        conn.send(post("/v1/stream/echo/w2", b"two") + post("/v1/stream/echo/w3", b"three"))
        assert [conn.read_response().body for _ in range(2)] == [b"two", b"three"]
        response = conn.exchange("GET", "/healthz")
        assert response.status == 200
        big = bytes(range(256)) * 1024  # more than one read of the socket
        assert conn.exchange("POST", "/v1/stream/echo/w4", body=big).body == big
        conn.send(
            b"POST /v1/stream/echo/w5 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert conn.read_head().status == 100
        conn.send(b"cont")
        assert conn.read_response().body == b"cont"
        for n in range(5):  # and plain appends again, each with its own request id
            conn.send(post(f"/v1/stream/echo/w6-{n}", b"%d" % n, f"X-Request-Id: w6-{n}\r\n"))
            response = conn.read_response()
            assert response.body == b"%d" % n and response.get("x-request-id") == f"w6-{n}"
        conn.send(post("/v1/stream/echo/w7", b"last", "Connection: close\r\n"))
        response = conn.read_response()
        assert response.body == b"last" and response.get("connection") == "close"
        assert conn.expect_eof(5) < 5
    with Conn(gateway.port) as conn:  # a client that closes after an answer
        assert conn.exchange("POST", "/v1/stream/echo/w8", body=b"x").body == b"x"
        assert conn.exchange("POST", "/v1/stream/echo/w9", body=b"y").body == b"y"
    with Conn(gateway.port) as conn:  # a malformed request on a served connection
        assert conn.exchange("POST", "/v1/stream/echo/w10", body=b"z").body == b"z"
        conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        response = conn.read_response()
        assert response.status == 400 and response.get("connection") == "close"
        assert conn.expect_eof(5) < 5
    deadline = time.monotonic() + 5
    while not any("w9" in line for line in gateway.lines):
        assert time.monotonic() < deadline, "no access log line for the last append"
        time.sleep(0.05)
    assert not any("failed" in line for line in gateway.lines), gateway.lines[-20:]
