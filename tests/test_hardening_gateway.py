"""The gateway's closed doors, against a real cluster with raw sockets and HTTP/2 as clients.

- SSE readers that never read (native HTTP/1.1, HTTP/1.0, a percent-encoded `live=`, many
  streams on one HTTP/2 connection) keep the gateway's memory bounded, are dropped, and
  what they held is released once they close.
- Request bodies that trickle or stall, and request heads that trickle, are cut within a
  bounded time (408 where an answer is still possible).
- Appends in flight to a shard that stops answering get 502/504 with no Retry-After (the
  outcome is unknown: they were in fact stored); a request sent while the shard is known
  down gets 503 with Retry-After.
- A request with both Content-Length and Transfer-Encoding is answered 400 and the
  connection closed: a request pipelined behind it is not served.
- Location is built from the gateway's public base URL, never from the client's Host.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import hpack
import httpx
import hyperframe.frame
import pytest
import trio
from support.cluster import running_cluster
from support.processes import rss

from ds_cluster.gateway.budget import OutputBudget
from ds_cluster.gateway.stream import StreamHandler
from ds_cluster.supervisor.cluster import Supervisor

MIB = 1024 * 1024
TEXT = "text/plain"


def gateway_pid(cluster: Supervisor) -> int:
    return cluster.child_pids()["gateway-0"]


def address(cluster: Supervisor) -> tuple[str, int]:
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def connect(cluster: Supervisor, rcvbuf: int | None = None) -> trio.SocketStream:
    """A raw client connection; `rcvbuf`: a small receive buffer, so a client that does not
    read fills up after little data (the server's own backlog then grows instead)."""
    host, port = address(cluster)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def read_until_closed(stream: trio.SocketStream, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after `limit` s)."""
    data = b""
    with trio.fail_after(limit):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset by the server: closed all the same
                return data
            if not chunk:
                return data
            data += chunk


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Supervisor]:
    async with running_cluster(tmp_path, shards=1) as supervisor:
        yield supervisor


async def fill_stream(url: str, path: str, size: int) -> None:
    """Create `path` holding `size` bytes (1 MiB appends)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.put(f"/v1/stream/{path}", headers={"content-type": TEXT})
        assert response.status_code == 201, response.text
        piece = b"y" * (MIB - 1) + b"\n"
        for _ in range(size // MIB):
            response = await client.post(
                f"/v1/stream/{path}", content=piece, headers={"content-type": TEXT}
            )
            assert response.status_code in (200, 204), response.text


# ---- bounded output ----------------------------------------------------------------

READERS = 12
STREAM_BYTES = 24 * MIB  # what each reader would be sent: far more than it may lag
GROWTH_LIMIT = 120 * MIB  # unbounded, the readers pin ~16 MiB each (~200 MiB)
AFTER_CLOSE_LIMIT = 48 * MIB


async def open_http1_readers(cluster: Supervisor, target: str, version: str) -> list:
    """READERS raw SSE requests, each with its own query (no two share an upstream),
    none of which reads its response."""
    streams = []
    for i in range(READERS):
        stream = await connect(cluster, rcvbuf=4096)
        request = f"GET {target}&reader={i} HTTP/{version}\r\nHost: x\r\n\r\n"
        await stream.send_all(request.encode())
        streams.append(stream)
    return streams


class H2Readers:
    """One HTTP/2 connection with READERS SSE streams, and a flow-control window so large
    that only the socket (which is never read) holds the server back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)

    async def open(self, host: str, target: str) -> None:
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        conn.increment_flow_control_window(2**31 - 1 - 65535)
        for i in range(READERS):
            headers = [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", host.encode()),
                (b":path", f"{target}&reader={i}".encode()),
            ]
            conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=True)
        await self.stream.send_all(conn.data_to_send())


async def non_reading_readers(cluster: Supervisor, kind: str, path: str) -> list:
    if kind == "h2":
        stream = await connect(cluster, rcvbuf=4096)
        readers = H2Readers(stream)
        host, port = address(cluster)
        await readers.open(f"{host}:{port}", f"/v1/stream/{path}?offset=-1&live=sse")
        return [stream]
    if kind == "http1.1":
        return await open_http1_readers(cluster, f"/v1/stream/{path}?offset=-1&live=sse", "1.1")
    if kind == "http1.0":
        return await open_http1_readers(cluster, f"/v1/stream/{path}?offset=-1&live=sse", "1.0")
    assert kind == "percent-encoded"
    return await open_http1_readers(cluster, f"/v1/stream/{path}?offset=-1&live=s%73e", "1.1")


@pytest.mark.parametrize("kind", ["http1.1", "http1.0", "percent-encoded", "h2"])
async def test_sse_readers_that_never_read_keep_gateway_memory_bounded(
    cluster: Supervisor, kind: str
) -> None:
    """Finding: each non-reading SSE reader on the ASGI path pinned ~16.5 MiB, and one
    HTTP/2 connection with 60 streams took the gateway to 1 GB (409 MiB kept after
    closing). Now each reader may lag 1 MiB, its connection a few, then it is dropped."""
    await fill_stream(cluster.url, "big", STREAM_BYTES)
    pid = gateway_pid(cluster)
    before = rss(pid)
    readers = await non_reading_readers(cluster, kind, "big")
    peak = before
    for _ in range(40):  # 8 s: the shard sends everything it has at once
        await trio.sleep(0.2)
        peak = max(peak, rss(pid))
    print(f"{kind}: gateway RSS +{(peak - before) / MIB:.1f} MiB at peak")
    assert peak - before < GROWTH_LIMIT, (kind, (peak - before) / MIB)
    for stream in readers:
        await stream.aclose()
    await trio.sleep(2)
    after = rss(pid)
    print(f"{kind}: gateway RSS +{(after - before) / MIB:.1f} MiB after closing")
    assert after - before < AFTER_CLOSE_LIMIT, (kind, (after - before) / MIB)
    # the gateway still serves
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        response = await client.get("/v1/stream/big", params={"offset": "-1"})
        assert response.status_code == 200


async def test_http2_connection_not_reading_many_answers_is_dropped(cluster: Supervisor) -> None:
    """Whole answers count too: 40 streams of 1 MiB reads on one HTTP/2 connection that
    reads nothing pass its budget; the connection is closed and its buffers released."""
    await fill_stream(cluster.url, "reads", 4 * MIB)
    pid = gateway_pid(cluster)
    before = rss(pid)
    stream = await connect(cluster, rcvbuf=4096)
    readers = H2Readers(stream)
    conn = readers.conn
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    host, port = address(cluster)
    for i in range(40):
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", f"{host}:{port}".encode()),
            (b":path", f"/v1/stream/reads?offset=-1&reader={i}".encode()),
        ]
        conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=True)
    await stream.send_all(conn.data_to_send())
    await trio.sleep(3)
    peak = rss(pid)
    await read_until_closed(stream, limit=40)  # the server closes it
    await stream.aclose()
    assert peak - before < 80 * MIB, (peak - before) / MIB


async def test_slow_sse_reader_is_dropped_and_its_connection_closed(cluster: Supervisor) -> None:
    """A reader more than its allowance behind is dropped: the server ends its connection
    (the client resumes from its last offset), it does not keep it open."""
    await fill_stream(cluster.url, "drop", 8 * MIB)
    stream = await connect(cluster, rcvbuf=4096)
    request = "GET /v1/stream/drop?offset=-1&live=s%73e HTTP/1.1\r\nHost: x\r\n\r\n"
    await stream.send_all(request.encode())
    await trio.sleep(3)  # the backlog passes the allowance while nobody reads
    data = await read_until_closed(stream, limit=40)
    assert data.startswith(b"HTTP/1.1 200")
    assert not data.endswith(b"0\r\n\r\n")  # cut, not ended normally
    assert len(data) < 8 * MIB


# ---- request bodies and heads must keep arriving -------------------------------------

BODY_CUT_LIMIT = 25.0  # BODY_GRACE (5 s) + slack for a loaded machine


async def trickle(stream: trio.SocketStream, *, every: float) -> bytes:
    """Send a byte every `every` seconds until the server answers or closes; what it sent."""
    data = b""
    while True:
        with trio.move_on_after(every):
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk
            continue
        try:
            await stream.send_all(b"x")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return data


@pytest.mark.parametrize("every", [0.5, 1000.0], ids=["trickled", "stalled"])
async def test_trickled_or_stalled_request_bodies_get_408_and_are_closed(
    cluster: Supervisor, every: float
) -> None:
    """Finding: 150 connections trickling their bodies stayed open for 60 s, one stalled
    body for 90+ s. Now a body must average BODY_MIN_RATE after BODY_GRACE."""
    count = 20
    results: list[tuple[float, bytes]] = []

    async def one(i: int) -> None:
        stream = await connect(cluster)
        head = (
            f"POST /v1/stream/slow{i} HTTP/1.1\r\nHost: x\r\nContent-Type: {TEXT}\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        await stream.send_all(head.encode())
        start = trio.current_time()
        with trio.fail_after(BODY_CUT_LIMIT + 10):
            data = await trickle(stream, every=every)
            if data and b"connection: close" in data.lower():
                data += await read_until_closed(stream, limit=5)
        results.append((trio.current_time() - start, data))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    assert len(results) == count
    for took, data in results:
        assert took < BODY_CUT_LIMIT, took
        assert data.startswith(b"HTTP/1.1 408"), data[:100]


async def test_stalled_request_body_on_the_asgi_path_gets_408(cluster: Supervisor) -> None:
    """A request the native route does not take (a percent-encoded query: the ASGI app
    parses it) has the same body deadline while the app waits for its body."""
    target = "/v1/stream/asgi-slow?offset=%2D1"
    assert StreamHandler.takes("GET", target.encode()) is None  # the ASGI path
    stream = await connect(cluster)
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"
    await stream.send_all(head.encode())
    start = trio.current_time()
    data = await read_until_closed(stream, limit=BODY_CUT_LIMIT + 10)
    assert trio.current_time() - start < BODY_CUT_LIMIT
    assert data.startswith(b"HTTP/1.1 408"), data


async def test_trickled_http2_request_body_gets_408_and_the_connection_lives_on(
    cluster: Supervisor,
) -> None:
    """On HTTP/2 the slow stream is answered 408 and reset; its connection serves on."""
    stream = await connect(cluster)
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    host, port = address(cluster)
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", f"{host}:{port}".encode()),
        (b":path", b"/v1/stream/slow-h2"),
        (b"content-type", TEXT.encode()),
    ]
    conn.send_headers(1, headers)
    await stream.send_all(conn.data_to_send())
    start = trio.current_time()
    status = None
    with trio.fail_after(BODY_CUT_LIMIT + 10):
        while status is None:
            data = None
            with trio.move_on_after(0.5):
                data = await stream.receive_some(65536)
            if data is None:  # nothing for half a second (a cancelled receive reads none)
                conn.send_data(1, b"x")  # one more byte, only while no answer was seen
                await stream.send_all(conn.data_to_send())
                continue
            assert data, "connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    status = dict(event.headers)[b":status"]
            await stream.send_all(conn.data_to_send())
    assert status == b"408"
    assert trio.current_time() - start < BODY_CUT_LIMIT
    # the connection still serves another request
    conn.send_headers(3, [*headers[:3], (b":path", b"/v1/stream/none-such")], end_stream=True)
    await stream.send_all(conn.data_to_send())
    status = None
    with trio.fail_after(10):
        while status is None:
            data = await stream.receive_some(65536)
            assert data, "connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 3:
                    status = dict(event.headers)[b":status"]
            await stream.send_all(conn.data_to_send())
    assert status == b"404"
    await stream.aclose()


async def test_trickled_request_head_is_cut(cluster: Supervisor) -> None:
    """A head that never completes (slowloris) is cut at the keep-alive deadline."""
    stream = await connect(cluster)
    start = trio.current_time()
    await stream.send_all(b"GET /v1/stream/x HTTP/1.1\r\n")
    with trio.fail_after(30):
        data = await trickle_header_lines(stream)
    assert trio.current_time() - start < 15
    assert not data.startswith(b"HTTP/1.1 2")


async def test_incomplete_http2_header_block_closes_a_busy_connection(cluster: Supervisor) -> None:
    """On HTTP/2 a header block left without its CONTINUATION is cut at the keep-alive
    deadline, even while another stream (an SSE read) keeps the connection busy."""
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        response = await client.put("/v1/stream/busy", headers={"content-type": TEXT})
        assert response.status_code == 201
    stream = await connect(cluster)
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    host, port = address(cluster)
    request = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", f"{host}:{port}".encode()),
        (b":path", b"/v1/stream/busy?offset=-1&live=sse"),
    ]
    conn.send_headers(1, request, end_stream=True)
    await stream.send_all(conn.data_to_send())
    block = hpack.Encoder().encode([*request[:3], (b":path", b"/v1/stream/busy")])
    half = hyperframe.frame.HeadersFrame(3, block[: len(block) // 2], flags=["END_STREAM"])
    start = trio.current_time()
    await stream.send_all(half.serialize())  # and never the CONTINUATION
    await read_until_closed(stream, limit=30)
    assert trio.current_time() - start < 15


async def trickle_header_lines(stream: trio.SocketStream) -> bytes:
    i = 0
    while True:
        with trio.move_on_after(1):
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return b""
            return chunk if not chunk else chunk + await read_until_closed(stream, limit=5)
        i += 1
        try:
            await stream.send_all(f"X-Slow-{i}: 1\r\n".encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""


# ---- honest answers ------------------------------------------------------------------


async def test_appends_in_flight_to_a_stopped_shard_get_502_or_504_without_retry_after(
    cluster: Supervisor,
) -> None:
    """Finding: appends in flight to a SIGSTOPped shard got 503 + Retry-After: 1 although
    all had been stored, so a retrying client wrote them twice. Now: 502/504, no
    Retry-After, and a message that says the outcome is unknown. A request sent while the
    shard is known to be down certainly did not reach it: 503 + Retry-After."""
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
        response = await client.put("/v1/stream/stopped", headers={"content-type": TEXT})
        assert response.status_code == 201
        shard = cluster.child_pids()["shard-0"]
        os.kill(shard, signal.SIGSTOP)
        try:
            answers: list[httpx.Response] = []

            async def append(i: int) -> None:
                answers.append(
                    await client.post(
                        "/v1/stream/stopped", content=f"m{i}\n", headers={"content-type": TEXT}
                    )
                )

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(append, i)
            for answer in answers:
                assert answer.status_code in (502, 504), (answer.status_code, answer.text)
                assert "retry-after" not in answer.headers
                assert "unknown" in answer.text
            # the gateway has dropped its link: a new request is not sent at all
            response = await client.post(
                "/v1/stream/stopped", content="late\n", headers={"content-type": TEXT}
            )
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
        finally:
            os.kill(shard, signal.SIGCONT)
        # what the 502/504s were about was in fact stored: a blind retry would duplicate
        with trio.fail_after(30):
            while True:
                response = await client.get("/v1/stream/stopped", params={"offset": "-1"})
                if response.status_code == 200:
                    break
                await trio.sleep(0.2)
        assert sorted(response.text.split()) == [f"m{i}" for i in range(5)]


# ---- CL + TE, Location ---------------------------------------------------------------


async def test_content_length_with_transfer_encoding_closes_the_connection(
    cluster: Supervisor,
) -> None:
    """RFC 9112 6.3: answer, then close; the request pipelined behind it is not served."""
    stream = await connect(cluster)
    smuggled = (
        f"POST /v1/stream/clte HTTP/1.1\r\nHost: x\r\nContent-Type: {TEXT}\r\n"
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        "1\r\nz\r\n0\r\n\r\n"
        "GET /v1/stream/clte HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    await stream.send_all(smuggled.encode())
    data = await read_until_closed(stream, limit=10)
    assert data.startswith(b"HTTP/1.1 400"), data
    assert data.count(b"HTTP/1.1 ") == 1, data
    assert b"connection: close" in data.lower()


async def test_location_ignores_a_forged_host(cluster: Supervisor) -> None:
    """Location is the gateway's own base URL (here its listen address), whatever Host
    the client sends."""
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        response = await client.put(
            "/v1/stream/where", headers={"content-type": TEXT, "host": "evil.example"}
        )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"{cluster.url}/v1/stream/where"


async def test_location_uses_the_configured_public_url(tmp_path: Path) -> None:
    """`ds-cluster up --public-url` (passed to the gateways as their --public-url)."""
    async with (
        running_cluster(tmp_path, shards=1, public_url="https://streams.example.com") as supervisor,
        httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client,
    ):
        response = await client.put(
            "/v1/stream/a%20b", headers={"content-type": TEXT, "host": "evil.example"}
        )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == "https://streams.example.com/v1/stream/a%20b"


# ---- the budget itself (pure) --------------------------------------------------------


def test_output_budget_admits_one_piece_then_refuses_a_connection_over_budget() -> None:
    process = OutputBudget(limit=100, connection_limit=10)
    first, second = process.connection(), process.connection()
    assert first.admit(50)  # one piece always goes to an empty connection
    assert not first.admit(1)  # over its own budget: the caller drops it
    assert second.admit(60)  # empty: admitted, though the process is now over its budget
    assert not second.admit(1)
    first.release(50)
    assert first.admit(5) and first.admit(5)
    assert process.held == 70
    second.close()  # a closed connection gives back everything it held
    assert process.held == 10
    first.release(1000)  # never below zero
    assert first.held == 0 and process.held == 0
