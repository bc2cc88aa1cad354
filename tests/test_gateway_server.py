"""Connection handling of gateway/server.py over real sockets.

What the lean server changes relative to hypercorn's own trio server, and what could
regress: keep-alive and pipelining, one socket write per complete response (head and
body together, no empty writes), SSE heads sent at once, the keep-alive timeout (idle
connections closed after keep_alive_timeout, busy ones never), keep_alive_max_requests,
graceful shutdown, chunked and 100-continue request bodies, HTTP/2 (prior knowledge and
h2c upgrade).

Most tests drive a real gateway process in front of the in-test fake shard (helpers from
tests/support); the last ones run `gateway.server.serve` in-process with a tiny
ASGI app, where the test counts the server's socket writes or needs a short keep-alive
timeout; one uses a real cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any

import h2.events
import httpx
import pytest
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from support.fakeshard import Reply, ThreadedShard, threaded_shard
from support.processes import GatewayProcess, gateway_for

from ds_cluster.common import tcp
from ds_cluster.gateway.http1 import SEPARATE_BODY_BYTES, Http1Connection
from ds_cluster.gateway.main import hypercorn_config
from ds_cluster.gateway.server import LeanConfig, serve
from ds_cluster.supervisor.cluster import Supervisor

# The gateway's own keep-alive timeout (hypercorn's default unless main.py changes it).
KEEP_ALIVE = float(hypercorn_config(graceful_timeout=3).keep_alive_timeout)

# ---------------------------------------------------------------------------------------
# A strict raw HTTP/1.1 client: requests go out byte for byte; responses are parsed by
# their framing, so stray or missing bytes show up in the next response.


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # the response exactly as received (head, and body with its framing)

    def get(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"{name} repeated: {self.headers}"
        return values[0] if values else None


def request(method: str, target: str, headers: str = "", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {target} HTTP/1.1\r\nHost: x\r\n{length}{headers}\r\n".encode() + body


def chunked_request(target: str, parts: list[bytes], headers: str = "") -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{headers}\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return head.encode() + chunks + b"0\r\n\r\n"


class Conn:
    """One client connection on a plain socket."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError(f"server closed the connection; unparsed: {self.buf[:200]!r}")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_head(self) -> HttpResponse:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        return HttpResponse(int(status), headers, b"", head + b"\r\n\r\n")

    def read_chunk(self) -> bytes:
        """One chunk of a chunked body (b"" for the last); no trailers expected."""
        line = self._line()
        size = int(line.split(b";")[0], 16)
        data = self._take(size + 2)
        assert data.endswith(b"\r\n"), data[-20:]
        return data[:-2]

    def read_response(self, method: str = "GET") -> HttpResponse:
        response = self.read_head()
        if method == "HEAD" or response.status in (204, 304) or response.status < 200:
            return response
        length = response.get("content-length")
        if length is not None:
            assert response.get("transfer-encoding") is None
            response.body = self._take(int(length))
            response.raw += response.body
        elif response.get("transfer-encoding") == "chunked":
            parts = []
            while chunk := self.read_chunk():
                parts.append(chunk)
            response.body = b"".join(parts)
            response.raw += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        else:
            raise AssertionError(f"response without framing: {response.raw!r}")
        return response

    def exchange(
        self, method: str, target: str, headers: str = "", body: bytes = b""
    ) -> HttpResponse:
        self.send(request(method, target, headers, body))
        return self.read_response(method)

    def expect_eof(self, timeout: float) -> float:
        """Seconds until the server closed the connection (nothing may arrive first)."""
        started = time.monotonic()
        assert not self.buf, f"unread bytes: {self.buf[:200]!r}"
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout} s") from None
        except ConnectionResetError:
            data = b""
        assert data == b"", f"unexpected bytes before close: {data[:200]!r}"
        return time.monotonic() - started

    def expect_silence(self, seconds: float) -> None:
        """Nothing arrives (and the connection stays open) for `seconds`."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        finally:
            self.sock.settimeout(5.0)
        raise AssertionError(f"expected nothing, got {data[:200]!r}")


def date_of(response: HttpResponse) -> float:
    """The response's Date header as a timestamp (must be present and current)."""
    value = response.get("date")
    assert value is not None, response.raw
    stamp = parsedate_to_datetime(value).timestamp()
    assert abs(stamp - time.time()) < 3, value
    return stamp


# ---------------------------------------------------------------------------------------
# The fake shard's behaviour, chosen by the first path segment.

GATES: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    return GATES.setdefault(name, threading.Event())


async def behave(msg: dict[str, Any], reply: Reply) -> None:
    i, path, method = msg["i"], msg["p"], msg["m"]
    kind, _, arg = path.partition("/")

    async def answer(status: int, headers: list[list[str]], body: bytes) -> None:
        await reply({"k": "res", "i": i, "s": status, "h": headers, "b": body, "more": False})

    async def start_sse(body: bytes = b"") -> None:
        headers = [["content-type", "text/event-stream"], ["cache-control", "no-cache"]]
        await reply({"k": "res", "i": i, "s": 200, "h": headers, "b": body, "more": True})

    async def event(data: bytes, more: bool = True) -> None:
        await reply({"k": "chunk", "i": i, "b": data, "more": more})

    if kind == "echo":  # the request body, or the path and query; HEAD: a GET's length
        body = msg["b"] or f"{path}?{msg['q']}".encode()
        headers = [["content-type", "application/octet-stream"]]
        if method == "HEAD":
            headers.append(["content-length", str(len(body))])
            body = b""
        await answer(200, headers, body)
    elif kind == "plain":  # no Content-Length from the shard (the gateway adds it to GETs)
        await answer(200, [["content-type", "text/plain"]], b"" if method == "HEAD" else b"plain")
    elif kind == "delay":  # delay/SECONDS: answer after a while
        await trio.sleep(float(arg))
        await answer(200, [["content-type", "text/plain"]], f"slept {arg}".encode())
    elif kind == "sse":  # sse/GATE: the head alone, one event once the gate opens, end
        await start_sse()
        opened = await trio.to_thread.run_sync(gate(arg).wait, 20, abandon_on_cancel=True)
        if opened:
            await event(b"data: released\n\n")
        await event(b"", more=False)
    elif kind == "ssegap":  # ssegap/SECONDS: an event, a silence, another event, end
        await start_sse(b"data: one\n\n")
        await trio.sleep(float(arg))
        await event(b"data: two\n\n")
        await event(b"", more=False)
    else:
        await answer(204, [], b"")


@pytest.fixture(scope="module")
def shard() -> Iterator[ThreadedShard]:
    with threaded_shard(behave) as threaded:
        yield threaded
        for event in GATES.values():
            event.set()


@pytest.fixture(scope="module")
def gateway(shard: ThreadedShard) -> Iterator[GatewayProcess]:
    with gateway_for(shard) as gw:
        yield gw


def wait_for_request(shard: ThreadedShard, path: str, query: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not any(m["p"] == path and m["q"] == query for m in list(shard.shard.requests)):
        assert time.monotonic() < deadline, f"the shard never got {path}?{query}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------
# The gateway process


def test_keep_alive_many_requests_on_one_connection(gateway: GatewayProcess) -> None:
    with Conn(gateway.port) as conn:
        for n in range(3):
            got = conn.exchange("GET", f"/v1/stream/echo/a?n={n}")
            assert got.status == 200
            assert got.body == f"echo/a?n={n}".encode()
            assert got.get("content-length") == str(len(got.body))
            date_of(got)

            got = conn.exchange("HEAD", f"/v1/stream/echo/a?n={n}")
            assert got.status == 200 and got.body == b""
            assert got.get("content-length") == str(len(f"echo/a?n={n}"))

            got = conn.exchange("HEAD", "/v1/stream/plain/x")  # head without a length
            assert got.status == 200 and got.get("content-length") is None

            got = conn.exchange("GET", "/v1/stream/plain/x")
            assert (got.status, got.body, got.get("content-length")) == (200, b"plain", "5")

            got = conn.exchange("DELETE", f"/v1/stream/gone{n}")
            assert got.status == 204 and got.get("content-length") is None

            got = conn.exchange("GET", "/v1/stream/a//b")
            assert got.status == 400 and got.body.strip()
            assert got.get("content-length") == str(len(got.body))

            payload = bytes(range(256)) * (n + 1)
            got = conn.exchange("POST", "/v1/stream/echo/post", body=payload)
            assert got.status == 200 and got.body == payload

            got = conn.exchange("GET", "/healthz")  # the control app
            assert got.status == 200 and got.get("content-length") == str(len(got.body))

            got = conn.exchange("OPTIONS", "/v1/stream/x")  # preflight: 204, length 0
            assert got.status == 204 and got.get("access-control-allow-methods")

            got = conn.exchange("PATCH", "/v1/stream/x")
            assert got.status == 405 and got.body.strip()

        got = conn.exchange("GET", "/v1/stream/echo/last", "Connection: close\r\n")
        assert got.status == 200 and got.body == b"echo/last?"
        assert got.get("connection") == "close"
        assert conn.expect_eof(2) < 2

    with Conn(gateway.port) as conn:  # HTTP/1.0: one request, then the server closes
        conn.send(b"GET /v1/stream/echo/old HTTP/1.0\r\n\r\n")
        got = conn.read_response()
        assert got.status == 200 and got.body == b"echo/old?"
        assert conn.expect_eof(2) < 2


def test_pipelined_requests_answered_in_order(gateway: GatewayProcess) -> None:
    with Conn(gateway.port) as conn:
        conn.send(
            request("GET", "/v1/stream/delay/0.3")  # the slow one first
            + request("GET", "/v1/stream/echo/p1")
            + request("HEAD", "/v1/stream/echo/p1")
            + request("GET", "/v1/stream/a/../b")
            + request("DELETE", "/v1/stream/p2")
            + request("POST", "/v1/stream/echo/p3", body=b"pipelined body")
            + chunked_request("/v1/stream/echo/p4", [b"chunk", b"ed"])
            + request("GET", "/v1/stream/echo/p5")
        )
        assert conn.read_response().body == b"slept 0.3"
        assert conn.read_response().body == b"echo/p1?"
        head = conn.read_response("HEAD")
        assert head.status == 200 and head.get("content-length") == "8"
        assert conn.read_response().status == 400
        assert conn.read_response().status == 204
        assert conn.read_response().body == b"pipelined body"
        assert conn.read_response().body == b"chunked"
        assert conn.read_response().body == b"echo/p5?"
        conn.expect_silence(0.2)
        assert conn.exchange("GET", "/v1/stream/echo/after").body == b"echo/after?"


def test_idle_connections_closed_busy_ones_kept(gateway: GatewayProcess) -> None:
    """A connection that never sends a request head is closed after keep_alive_timeout;
    an answered one waits longer for its next request (the gateway's --idle-timeout,
    65 s here) and is served after a pause of more than keep_alive_timeout; a long-poll or
    an SSE response that lasts longer than that is busy, not idle, and its connection stays
    usable afterwards."""
    assert KEEP_ALIVE <= 6, "this test waits about keep_alive_timeout + 1.5 s"
    busy = KEEP_ALIVE + 1.0

    def after_request() -> float:
        with Conn(gateway.port, timeout=busy + 5) as conn:
            got = conn.exchange("GET", "/v1/stream/echo/idle")
            assert got.body == b"echo/idle?"
            stamp = date_of(got)
            conn.expect_silence(busy)  # still open past keep_alive_timeout
            assert conn.exchange("GET", "/v1/stream/echo/again").body == b"echo/again?"
            return stamp

    def never_spoke() -> float:
        with Conn(gateway.port) as conn:
            return conn.expect_eof(KEEP_ALIVE + 3)

    def long_poll() -> float:
        with Conn(gateway.port, timeout=busy + 5) as conn:
            got = conn.exchange("GET", f"/v1/stream/delay/{busy}?live=long-poll")
            assert got.status == 200 and got.body == f"slept {busy}".encode()
            assert conn.exchange("GET", "/v1/stream/echo/lp").body == b"echo/lp?"
            return date_of(got)

    def sse() -> None:
        with Conn(gateway.port, timeout=busy + 5) as conn:
            got = conn.exchange("GET", f"/v1/stream/ssegap/{busy}?live=sse")
            assert got.status == 200
            assert got.body == b"data: one\n\ndata: two\n\n"
            assert conn.exchange("GET", "/v1/stream/echo/sse").body == b"echo/sse?"

    with ThreadPoolExecutor(4) as pool:
        idle = pool.submit(after_request)
        silent = pool.submit(never_spoke)
        polled = pool.submit(long_poll)
        streamed = pool.submit(sse)
        first_date = idle.result()
        assert KEEP_ALIVE - 1 <= silent.result() <= KEEP_ALIVE + 2
        assert polled.result() > first_date  # the cached Date header moves on
        streamed.result()


def test_answered_connection_idle_timeout_and_a_slow_next_head(shard: ThreadedShard) -> None:
    """With --idle-timeout 2: an answered connection that sends nothing is closed after
    about 2 s; one whose next request head starts but never ends is closed
    keep_alive_timeout after its first byte, however long the idle timeout."""
    with gateway_for(shard, "--idle-timeout", "2") as short, Conn(short.port) as conn:
        assert conn.exchange("GET", "/v1/stream/echo/i1").body == b"echo/i1?"
        assert 1 <= conn.expect_eof(6) <= 4
    with gateway_for(shard, "--idle-timeout", "60") as long, Conn(long.port) as conn:
        assert conn.exchange("GET", "/v1/stream/echo/i2").body == b"echo/i2?"
        conn.send(b"GET /v1/stream/echo/i3 HTTP/1.1\r\nHost: x\r\n")  # never ends
        assert KEEP_ALIVE - 1 <= conn.expect_eof(KEEP_ALIVE + 5) <= KEEP_ALIVE + 3


def test_sse_head_sent_before_any_event(gateway: GatewayProcess) -> None:
    name = uuid.uuid4().hex
    with Conn(gateway.port) as conn:
        conn.send(request("GET", f"/v1/stream/sse/{name}?live=sse"))
        head = conn.read_head()  # the shard has written no event yet
        assert not gate(name).is_set()
        assert head.status == 200
        assert head.get("content-type") == "text/event-stream"
        assert head.get("content-length") is None
        assert head.get("transfer-encoding") == "chunked"
        assert conn.buf == b""
        conn.expect_silence(0.1)
        gate(name).set()
        assert conn.read_chunk() == b"data: released\n\n"
        assert conn.read_chunk() == b""
        assert conn.exchange("GET", "/v1/stream/echo/next").status == 200


def test_chunked_and_expect_continue_bodies(gateway: GatewayProcess) -> None:
    with Conn(gateway.port) as conn:
        parts = [b"a" * 10, b"b" * 100_000, b"c"]
        conn.send(chunked_request("/v1/stream/echo/chunked", parts))
        got = conn.read_response()
        assert got.status == 200 and got.body == b"".join(parts)
        assert got.get("content-length") == str(len(got.body))

        body = b"sent after 100 Continue"
        conn.send(
            request("POST", "/v1/stream/echo/expect", "Expect: 100-continue\r\n")[:-2]
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        interim = conn.read_head()  # before any body byte was sent
        assert interim.status == 100
        conn.send(body)
        got = conn.read_response()
        assert got.status == 200 and got.body == body

        conn.send(
            b"POST /v1/stream/echo/both HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        assert conn.read_head().status == 100
        conn.send(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert conn.read_response().body == b"abcde"
        assert conn.exchange("GET", "/v1/stream/echo/then").body == b"echo/then?"


def test_http2_prior_knowledge(gateway: GatewayProcess) -> None:
    with httpx.Client(base_url=gateway.url, http1=False, http2=True, timeout=5) as client:
        got = client.get("/v1/stream/echo/h2?x=1")
        assert got.http_version == "HTTP/2"
        assert got.status_code == 200 and got.content == b"echo/h2?x=1"
        got = client.post("/v1/stream/echo/h2", content=b"over h2")
        assert got.status_code == 200 and got.content == b"over h2"
        got = client.head("/v1/stream/echo/h2")
        assert got.status_code == 200 and got.headers["content-length"] == str(len("echo/h2?"))
        assert client.delete("/v1/stream/h2gone").status_code == 204
        assert client.get("/v1/stream/a//b").status_code == 400
        assert client.get("/healthz").status_code == 200
        with client.stream("GET", "/v1/stream/ssegap/0.05?live=sse") as stream:
            assert stream.http_version == "HTTP/2"
            assert stream.headers["content-type"] == "text/event-stream"
            assert stream.read() == b"data: one\n\ndata: two\n\n"


def h2_response(conn: Conn, client: H2Connection, stream_id: int) -> tuple[bytes, bytes]:
    """Feed the server's bytes to the h2 client until `stream_id` ends: (status, body)."""
    status, body = b"", b""
    while True:
        data, conn.buf = conn.buf, b""
        if not data:
            data = conn.sock.recv(65536)
            assert data, "server closed the HTTP/2 connection"
        for event in client.receive_data(data):
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"]
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                client.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                conn.send(client.data_to_send())
                return status, body
        conn.send(client.data_to_send())


def test_h2c_upgrade(gateway: GatewayProcess) -> None:
    client = H2Connection(H2Configuration(client_side=True))
    settings = client.initiate_upgrade_connection()
    with Conn(gateway.port) as conn:
        conn.send(
            request(
                "GET",
                "/v1/stream/echo/h2c",
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                f"HTTP2-Settings: {settings.decode()}\r\n",
            )
        )
        switching = conn.read_head()
        assert switching.status == 101 and switching.get("upgrade") == "h2c"
        conn.send(client.data_to_send())
        assert h2_response(conn, client, 1) == (b"200", b"echo/h2c?")
        headers = [(":method", "GET"), (":path", "/v1/stream/echo/again"), (":scheme", "http")]
        client.send_headers(3, [*headers, (":authority", "x")], end_stream=True)
        conn.send(client.data_to_send())
        assert h2_response(conn, client, 3) == (b"200", b"echo/again?")


def test_sigterm_closes_idle_finishes_busy(shard: ThreadedShard) -> None:
    graceful = 2.0
    gw = GatewayProcess(f"s1=127.0.0.1:{shard.shard.port}", "--graceful-timeout", str(graceful))
    try:
        assert gw.wait_ready().status_code == 200
        with Conn(gw.port) as idle, Conn(gw.port) as busy, Conn(gw.port) as endless:
            assert idle.exchange("GET", "/v1/stream/echo/idle").status == 200
            endless.send(request("GET", "/v1/stream/ssegap/1000?live=sse"))
            assert endless.read_head().status == 200
            assert endless.read_chunk() == b"data: one\n\n"
            busy.send(request("GET", "/v1/stream/delay/0.8?t=shutdown"))
            wait_for_request(shard, "delay/0.8", "t=shutdown")

            signalled = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            assert idle.expect_eof(graceful) < 0.5 * graceful  # promptly, not at the deadline
            with pytest.raises(ConnectionRefusedError):  # no longer accepting
                socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()

            got = busy.read_response()  # the request in flight is answered in full
            assert got.status == 200 and got.body == b"slept 0.8"
            busy.expect_eof(1)  # and its connection closed after it

            # A busy SSE is not "idle": it lasts until the graceful timeout cancels it.
            endless.sock.settimeout(graceful + 2)
            with pytest.raises((EOFError, ConnectionResetError)):
                while True:
                    endless.read_chunk()
            assert time.monotonic() - signalled > graceful - 0.5
            code = gw.proc.wait(5)
        assert code == 0, "".join(gw.lines[-30:])
        assert time.monotonic() - signalled < graceful + 3
    finally:
        if gw.proc.poll() is None:
            gw.stop()


@pytest.mark.parametrize("cluster", [1], indirect=True)
async def test_real_cluster_bodies_and_sse(cluster: Supervisor) -> None:
    port = int(cluster.url.rsplit(":", 1)[1])
    await trio.to_thread.run_sync(partial(real_cluster_scenario, port))


def real_cluster_scenario(port: int) -> None:
    name = f"/v1/stream/server-{uuid.uuid4().hex[:8]}"
    with Conn(port) as conn, Conn(port) as live:
        created = conn.exchange("PUT", name, "Content-Type: text/plain\r\n")
        assert created.status == 201, created.raw

        conn.send(chunked_request(name, [b"hello", b" ", b"world"], "Content-Type: text/plain\r\n"))
        assert conn.read_response().status in (200, 204)
        conn.send(
            request("POST", name, "Content-Type: text/plain\r\nExpect: 100-continue\r\n")[:-2]
            + b"Content-Length: 1\r\n\r\n"
        )
        assert conn.read_head().status == 100
        conn.send(b"!")
        assert conn.read_response().status in (200, 204)

        read = conn.exchange("GET", f"{name}?offset=-1")
        assert read.status == 200 and read.body == b"hello world!"
        tail = read.get("stream-next-offset")
        assert tail
        head = conn.exchange("HEAD", name)
        assert head.status == 200 and head.get("stream-next-offset") == tail

        live.send(request("GET", f"{name}?offset={tail}&live=sse"))
        sse = live.read_head()  # before anything new was appended
        assert sse.status == 200
        assert (sse.get("content-type") or "").startswith("text/event-stream")
        assert sse.get("content-length") is None
        appended = conn.exchange("POST", name, "Content-Type: text/plain\r\n", b"late")
        assert appended.status in (200, 204)
        seen = b""
        while b"data:late" not in seen:
            seen += live.read_chunk()


# ---------------------------------------------------------------------------------------
# `serve` in-process: count the server's writes, shorten the keep-alive timeout.


def tiny_app(gates: dict[str, trio.Event]) -> Any:
    """/len/N: N bytes with a Content-Length; /nolength: 204 without one; /sleep/S: a
    Content-Length answer after S seconds; /sse/NAME: an event stream whose one event
    waits for gates[NAME]."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            if not message.get("more_body"):
                break
        kind, _, arg = scope["path"].strip("/").partition("/")
        if kind == "sse":
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await gates[arg].wait()
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if kind == "nolength":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if kind == "sleep":
            await trio.sleep(float(arg))
            arg = "5"
        body = b"x" * int(arg)
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@asynccontextmanager
async def lean_server(
    app: Any, stop: trio.Event | None = None, **settings: Any
) -> AsyncIterator[int]:
    """`serve(app)` on 127.0.0.1 in this trio run; yields the port; graceful stop when
    `stop` is set or the block ends. `settings`: hypercorn Config attributes."""
    config = LeanConfig()
    config.accesslog = None
    for key, value in settings.items():
        setattr(config, key, value)
    stop = trio.Event() if stop is None else stop
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config, listeners, shutdown_trigger=stop.wait))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            stop.set()


@pytest.fixture
def server_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every socket write of an HTTP/1.1 connection (`Http1Connection._write`; a head and
    body written apart as two) the server made in this test's trio run (the module's fake
    shard runs its own trio loop in another thread)."""
    writes: list[bytes] = []
    write, write_pair = Http1Connection._write, Http1Connection._write_pair
    owner = threading.get_ident()

    async def recording(self: Http1Connection, data: Any) -> None:
        if threading.get_ident() == owner:
            writes.append(bytes(data))
        await write(self, data)

    async def recording_pair(self: Http1Connection, head: bytes, body: bytes) -> None:
        if threading.get_ident() == owner:
            writes.extend([bytes(head), bytes(body)])
        await write_pair(self, head, body)

    monkeypatch.setattr(Http1Connection, "_write", recording)
    monkeypatch.setattr(Http1Connection, "_write_pair", recording_pair)
    return writes


async def test_complete_response_is_one_write(server_writes: list[bytes]) -> None:
    """One write per complete response; a body of SEPARATE_BODY_BYTES or more is written
    apart from its head (two writes, no copy of the body behind the head)."""
    gates = {"g": trio.Event()}
    token = trio.lowlevel.current_trio_token()

    def client(port: int) -> None:
        with Conn(port) as conn:
            for method, target, body in [
                ("GET", "/len/10", b""),
                ("HEAD", "/len/10", b""),
                ("GET", "/len/0", b""),
                ("GET", "/len/60000", b""),  # more than one TCP segment, below the split
                ("GET", "/len/300000", b""),  # head and body written apart
                ("GET", "/nolength", b""),
                ("POST", "/len/3", b"request body"),
                ("GET", "/len/1", b""),
            ]:
                mark = len(server_writes)
                got = conn.exchange(method, target, body=body)
                assert got.status in (200, 204)
                writes = server_writes[mark:]
                if len(got.body) >= SEPARATE_BODY_BYTES:
                    assert writes == [got.raw[: -len(got.body)], got.body], target
                else:
                    assert writes == [got.raw], (target, writes)
                if method == "HEAD":
                    assert got.get("content-length") == "10"
                date_of(got)

            mark = len(server_writes)
            conn.send(request("GET", "/sse/g"))
            head = conn.read_head()  # the app has sent no body yet: the head went alone
            assert head.status == 200 and head.get("content-type") == "text/event-stream"
            assert server_writes[mark:] == [head.raw]
            trio.from_thread.run_sync(gates["g"].set, trio_token=token)
            assert conn.read_chunk() == b"data: 1\n\n"
            assert conn.read_chunk() == b""
            assert conn.exchange("GET", "/len/2").body == b"xx"

        with Conn(port) as conn:  # a malformed head: 400 in one write, then close
            mark = len(server_writes)
            conn.send(b"NOT HTTP AT ALL\r\n\r\n")
            got = conn.read_response()
            assert got.status == 400 and got.get("connection") == "close"
            conn.expect_eof(2)
            assert server_writes[mark:] == [got.raw]

    async with lean_server(tiny_app(gates)) as port:
        await trio.to_thread.run_sync(client, port)
    assert b"" not in server_writes  # empty writes are skipped


async def test_idle_deadline_moves_with_each_request() -> None:
    """(Here the wait between requests is as short as the keep-alive timeout.)"""
    keep_alive = 0.6
    gates = {"w": trio.Event()}
    results: dict[str, Any] = {}

    def chatty(port: int) -> None:  # a request every 0.2 s for 1.4 s: never idle for 0.6 s
        with Conn(port) as conn:
            for _ in range(7):
                assert conn.exchange("GET", "/len/4").body == b"xxxx"
                time.sleep(0.2)
            assert conn.exchange("GET", "/len/4").body == b"xxxx"
            results["chatty"] = conn.expect_eof(3)

    def slow(port: int) -> None:  # busy for 1.5 s
        with Conn(port) as conn:
            assert conn.exchange("GET", "/sleep/1.5").body == b"xxxxx"
            results["slow"] = conn.expect_eof(3)

    def silent(port: int) -> None:
        with Conn(port) as conn:
            results["silent"] = conn.expect_eof(3)

    def streaming(port: int) -> None:  # an SSE response open for 1.5 s
        with Conn(port) as conn:
            got = conn.exchange("GET", "/sse/w")
            assert got.body == b"data: 1\n\n"
            results["streaming"] = conn.expect_eof(3)

    async with (
        lean_server(
            tiny_app(gates), keep_alive_timeout=keep_alive, idle_timeout=keep_alive
        ) as port,
        trio.open_nursery() as nursery,
    ):
        for client in (chatty, slow, silent, streaming):
            nursery.start_soon(partial(trio.to_thread.run_sync, client, port))
        await trio.sleep(1.5)
        gates["w"].set()
    assert sorted(results) == ["chatty", "silent", "slow", "streaming"]
    for name, closed_after in results.items():
        # (the lower bound is loose: the client starts its clock after reading the answer)
        assert keep_alive - 0.35 <= closed_after <= keep_alive + 1.0, (name, closed_after)


@pytest.mark.parametrize("target", ["/len/4", "/nolength"])
async def test_keep_alive_max_requests(target: str) -> None:
    """The last allowed request's response says Connection: close (whether its head was
    held for the body or not), then the server closes."""

    def client(port: int) -> None:
        with Conn(port) as conn:
            for n in range(1, 4):
                got = conn.exchange("GET", target)
                assert got.status in (200, 204)
                assert (got.get("connection") == "close") == (n == 3), (n, got.raw)
            conn.expect_eof(2)

    async with lean_server(tiny_app({}), keep_alive_max_requests=3) as port:
        await trio.to_thread.run_sync(client, port)


async def test_http2_busy_at_shutdown_closed_after_its_response() -> None:
    """As hypercorn: the response in flight completes, then GOAWAY and the socket closes
    at once; the server does not wait for graceful_timeout."""
    graceful = 2.0
    stop = trio.Event()
    token = trio.lowlevel.current_trio_token()
    timings: dict[str, float] = {}

    def client(port: int) -> None:
        client = H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        headers = [(":method", "GET"), (":path", "/sleep/0.3"), (":scheme", "http")]
        client.send_headers(1, [*headers, (":authority", "x")], end_stream=True)
        with Conn(port) as conn:
            conn.send(client.data_to_send())
            time.sleep(0.1)  # the request is in flight
            trio.from_thread.run_sync(stop.set, trio_token=token)
            assert h2_response(conn, client, 1) == (b"200", b"xxxxx")
            answered = time.monotonic()
            conn.sock.settimeout(graceful + 2)
            while conn.sock.recv(65536):  # GOAWAY, then the close
                pass
            timings["closed_after_response"] = time.monotonic() - answered

    async with lean_server(tiny_app({}), stop, graceful_timeout=graceful) as port:
        await trio.to_thread.run_sync(client, port)
    assert timings["closed_after_response"] < graceful / 2


async def test_a_large_body_goes_to_the_socket_in_few_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel may hold up to `common.tcp.UNSENT_LIMIT` unsent bytes of a client's
    socket (trio's sockets hold 16 KiB): a large body reaches it in a few system calls,
    not in one per 16 KiB the client reads, each a round through trio's scheduler."""
    calls: list[int] = []
    owner = threading.get_ident()

    def counted(real: Any) -> Any:  # os.write or os.writev, each call of this run counted
        def call(fd: int, data: Any) -> int:
            written: int = real(fd, data)
            if threading.get_ident() == owner:
                calls.append(written)
            return written

        return call

    size = 8 * 1024 * 1024

    def client(port: int) -> None:
        with socket.socket() as sock:
            # A client that takes the body in small pieces: the server's socket fills up.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request("GET", f"/len/{size}") * 2)
            for _ in range(2):
                mark = len(calls)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += sock.recv(1)
                received = 0
                while received < size:
                    piece = sock.recv(min(64 * 1024, size - received))
                    assert piece
                    received += len(piece)
            # The second (its buffers grown): a write per half UNSENT_LIMIT the client
            # reads at worst, against one per 16 KiB or so at trio's setting.
            writes = calls[mark:]
            assert len(writes) <= 3 * size // tcp.UNSENT_LIMIT, writes

    monkeypatch.setattr(os, "write", counted(os.write))
    monkeypatch.setattr(os, "writev", counted(os.writev))
    async with lean_server(tiny_app({})) as port:
        await trio.to_thread.run_sync(client, port)
