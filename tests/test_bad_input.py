"""Bad input changes nothing (issue 3, item 7), against real processes.

Garbage on a shard's RPC port drops that connection only; oversize bodies get 413 at the
gateway; invalid stream paths and malformed headers get 400. After each, the stream is
unchanged, every process is still the one we started (no restart), and the cluster serves.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
from support.auth import open_authenticated

from ds_cluster.common import wire
from ds_cluster.common.ring import Ring
from ds_cluster.common.rpc_security import SECRET_FILE_NAME, read_secret_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
JSON_TYPE = "application/json"
MAX_BODY = 4096


def path_on(shards: list[str], shard: str, stem: str) -> str:
    ring = Ring(1, tuple(shards))
    return next(f"{stem}-{n}" for n in range(100_000) if ring.owner(f"{stem}-{n}") == shard)


@pytest.fixture
async def cluster(start_cluster) -> AsyncIterator:
    async with start_cluster(shards=2) as supervisor:
        yield supervisor


async def content(client: httpx.AsyncClient, url: str) -> tuple[int, list]:
    response = await client.get(url, params={"offset": "-1"})
    return response.status_code, (response.json() if response.status_code == 200 else [])


def assert_no_restarts(supervisor, pids: dict[str, int]) -> None:
    assert supervisor.restarts == [], [f"{e.name} {e.how}" for e in supervisor.restarts]
    assert supervisor.child_pids() == pids


# ---- the shard's RPC port --------------------------------------------------------------


async def wire_receive(stream: trio.SocketStream, decoder: wire.FrameDecoder) -> dict:
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            assert data, "the shard closed a healthy connection"
            messages = decoder.feed(data)
            if messages:
                return messages[0]


async def assert_dropped(address: tuple[str, int], garbage: bytes) -> None:
    """Send `garbage` on a fresh connection; the shard must close it (EOF or reset)."""
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(garbage)
    await assert_closed(stream)


async def assert_closed(stream: trio.SocketStream) -> None:
    """The shard closes `stream` (EOF or reset) within 10 s; it is closed here after."""
    try:
        with trio.fail_after(10):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                # A hello or an error frame before closing is fine; keep reading until EOF.
    finally:
        await trio.aclose_forcefully(stream)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def hello() -> dict:
    return {"k": "hello", "role": "gateway", "id": "test", "nonce": b"n" * 32, "r": 1}


async def authenticated(cluster, shard_id: str) -> tuple[trio.SocketStream, wire.FrameDecoder]:
    """A wire connection to `shard_id` that has proven the cluster's secret."""
    secret = read_secret_file(cluster.data_dir / SECRET_FILE_NAME)
    address = ("127.0.0.1", cluster.shard_addresses[shard_id][1])
    stream, decoder, _ = await open_authenticated(address, shard_id, secret=secret)
    return stream, decoder


async def test_garbage_on_shard_port_drops_only_that_connection(cluster) -> None:
    pids = cluster.child_pids()
    shards = cluster.shard_ids
    address = ("127.0.0.1", cluster.shard_addresses["shard-0"][1])
    path = path_on(shards, "shard-0", "wire-ok")

    # A healthy connection, authenticated, held open across all the garbage below.
    good, decoder = await authenticated(cluster, "shard-0")
    # A connection stalled in the middle of a frame must not block anyone either.
    stalled = await trio.open_tcp_stream(*address)
    await stalled.send_all(struct.pack(">I", 100) + b"\x81\xa1k")

    greeting = wire.encode(hello())
    garbage = [
        os.urandom(256),
        frame(b"\xc1\xc1\xc1\xc1"),  # 0xc1 is never valid msgpack
        frame(msgpack.packb([1, 2, 3])),  # an op request of too few items, before hello
        frame(msgpack.packb({"v": 1, "x": 1})),  # no kind
        frame(msgpack.packb({"v": 99, "k": "hello"})),  # unknown wire version
        struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 16,  # absurd length
        wire.encode({"k": "req", "i": 1, "op": "http", "m": "PUT", "p": path}),  # no hello
        greeting + wire.encode({"k": "req", "i": "one", "op": "http"}),  # bad request id
        greeting + frame(b"\x92\x01"),  # truncated msgpack after a good hello
    ]
    # Requests of the wrong shape close their connection, even after authentication.
    malformed = [
        {"op": "http", "m": "PUT", "p": path, "q": "", "h": "not-a-list", "b": b""},
        {"op": "http", "m": "PUT", "p": path, "q": "", "h": [[1, 2, 3]], "b": b""},
        {"op": "http", "m": "PUT", "p": path, "q": "", "h": [], "b": "text, not bytes"},
        {"op": "http", "m": 7, "p": path, "q": "", "h": [], "b": b""},
    ]
    for blob in garbage:
        await assert_dropped(address, blob)
    for req in malformed:
        stream, _ = await authenticated(cluster, "shard-0")
        await stream.send_all(wire.encode({"k": "req", "i": 5, "r": 1, **req}))
        await assert_closed(stream)

    # A well-formed request for an unknown op gets an error answer, and changes nothing.
    await good.send_all(wire.encode({"k": "req", "i": 101, "r": 1, "op": "nope", "a": {}}))
    answer = await wire_receive(good, decoder)
    assert answer["i"] == 101 and answer["k"] == "err", answer

    # The greeted connection still works, and so does the cluster through the gateway.
    await good.send_all(
        wire.encode(
            {
                "k": "req",
                "i": 1,
                "r": 1,
                "op": "http",
                "m": "PUT",
                "p": path,
                "q": "",
                "h": [["content-type", JSON_TYPE]],
                "b": b"",
            }
        )
    )
    answer = await wire_receive(good, decoder)
    assert answer["k"] == "res" and answer["s"] == 201, answer
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        assert (await client.head(f"/v1/stream/{path}")).status_code == 200
        response = await client.post(
            f"/v1/stream/{path}", headers={"content-type": JSON_TYPE}, content=b'["x"]'
        )
        assert response.status_code == 204
        assert await content(client, cluster.url + f"/v1/stream/{path}") == (200, ["x"])
        assert (await client.get("/readyz")).status_code == 200
    await trio.aclose_forcefully(stalled)
    await trio.aclose_forcefully(good)
    assert_no_restarts(cluster, pids)


async def test_invalid_path_over_the_wire_is_refused(cluster) -> None:
    """A wire client that skips the gateway's validation still cannot create bad paths."""
    stream, decoder = await authenticated(cluster, "shard-0")
    for n, bad in enumerate(["a//b", "../x", "a/./b", "", "a\x00b", "x" * 2000]):
        await stream.send_all(
            wire.encode(
                {
                    "k": "req",
                    "i": n + 1,
                    "r": 1,
                    "op": "http",
                    "m": "PUT",
                    "p": bad,
                    "q": "",
                    "h": [["content-type", JSON_TYPE]],
                    "b": b"",
                }
            )
        )
        answer = await wire_receive(stream, decoder)
        assert answer["k"] == "err" or answer["s"] in (400, 421), (bad[:20], answer)
    await trio.aclose_forcefully(stream)


# ---- the gateway: body size, paths, headers --------------------------------------------


@pytest.fixture
async def small_gateway(cluster, tmp_path) -> AsyncIterator[str]:
    """A second gateway on the same shards, with a 4 KiB body limit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shards = ",".join(f"{sid}=127.0.0.1:{p}" for sid, (_, p) in cluster.shard_addresses.items())
    argv = [sys.executable, "-m", "ds_cluster", "gateway", "--listen", f"127.0.0.1:{port}"]
    argv += ["--shards", shards, "--max-body-bytes", str(MAX_BODY)]
    argv += ["--cluster-secret-file", str(cluster.data_dir / SECRET_FILE_NAME)]
    log = open(tmp_path / "small-gateway.log", "wb")  # noqa: SIM115
    proc = await trio.lowlevel.open_process(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await client.get(url + "/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.1)
        yield url
        assert proc.returncode is None, "the gateway died"
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def test_oversize_bodies_get_413_and_change_nothing(cluster, small_gateway) -> None:
    pids = cluster.child_pids()
    url = small_gateway + "/v1/stream/big"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.put(url, headers={"content-type": JSON_TYPE})).status_code == 201
        ok = await client.post(url, headers={"content-type": JSON_TYPE}, content=b'["small"]')
        assert ok.status_code == 204
        big = b'["' + b"x" * MAX_BODY + b'"]'
        response = await client.post(url, headers={"content-type": JSON_TYPE}, content=big)
        assert response.status_code == 413

        async def chunks():  # no Content-Length: the limit must hold while streaming
            for _ in range(8):
                yield b"x" * 1024

        response = await client.post(
            url, headers={"content-type": "application/octet-stream"}, content=chunks()
        )
        assert response.status_code == 413
        response = await client.put(
            small_gateway + "/v1/stream/big-create",
            headers={"content-type": JSON_TYPE},
            content=big,
        )
        assert response.status_code == 413
        assert (await client.head(small_gateway + "/v1/stream/big-create")).status_code == 404
        assert await content(client, url) == (200, ["small"])
        # Exactly at the limit is fine.
        exact = b'["' + b"y" * (MAX_BODY - 4) + b'"]'
        response = await client.post(url, headers={"content-type": JSON_TYPE}, content=exact)
        assert response.status_code == 204
    assert_no_restarts(cluster, pids)


def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side normalisation); return (status, raw reply)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), reply[:200]
    return int(status_line.split()[1]), reply


BAD_PATHS = [
    "/v1/stream/",
    "/v1/stream/a//b",
    "/v1/stream/a/",
    "/v1/stream//a",
    "/v1/stream/./a",
    "/v1/stream/a/..",
    "/v1/stream/a/../b",
    "/v1/stream/%2e%2e/a",
    "/v1/stream/a/%2E",
    "/v1/stream/a%00b",
    "/v1/stream/a%01b",
    "/v1/stream/a%7fb",
    "/v1/stream/a%0d%0ab",
    "/v1/stream/a%ffb",  # not UTF-8
    "/v1/stream/" + "x" * 1025,
    "/v1/stream/" + "%41" * 1025,
]


@pytest.mark.parametrize("method", ["PUT", "GET", "POST"])
async def test_invalid_stream_paths_get_400(cluster, method: str) -> None:
    pids = cluster.child_pids()
    for path in BAD_PATHS:
        body = b'["x"]' if method != "GET" else b""
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {JSON_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        status, reply = await trio.to_thread.run_sync(raw_request, cluster.url, request)
        assert status == 400, (path[:40], reply[:300])
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        assert (await client.get("/readyz")).status_code == 200
        assert (
            await client.put("/v1/stream/a", headers={"content-type": JSON_TYPE})
        ).status_code in (
            200,
            201,
        )
    assert_no_restarts(cluster, pids)


async def test_malformed_headers_get_400_and_change_nothing(cluster) -> None:
    pids = cluster.child_pids()
    url = cluster.url + "/v1/stream/headers"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.put(url, headers={"content-type": JSON_TYPE})).status_code == 201
        producer = {"producer-id": "p", "producer-epoch": "0", "producer-seq": "0"}
        first = await client.post(
            url, headers={"content-type": JSON_TYPE, **producer}, content=b'["one"]'
        )
        assert first.status_code == 200
        bad_posts = [
            {"producer-id": "p", "producer-epoch": "abc", "producer-seq": "1"},
            {"producer-id": "p", "producer-epoch": "0", "producer-seq": "-1"},
            {"producer-id": "p", "producer-epoch": "0", "producer-seq": "1.5"},
            {"producer-id": "p", "producer-epoch": "0", "producer-seq": "9007199254740993"},
            {"producer-id": "p"},
            {"producer-id": "", "producer-epoch": "0", "producer-seq": "1"},
            {"producer-epoch": "0", "producer-seq": "1"},
        ]
        for extra in bad_posts:
            response = await client.post(
                url, headers={"content-type": JSON_TYPE, **extra}, content=b'["bad"]'
            )
            assert response.status_code == 400, (extra, response.status_code, response.text)
        for extra in [{"stream-ttl": "abc"}, {"stream-ttl": "-5"}, {"stream-expires-at": "soon"}]:
            response = await client.put(
                cluster.url + "/v1/stream/headers-new",
                headers={"content-type": JSON_TYPE, **extra},
            )
            assert response.status_code == 400, (extra, response.status_code)
        response = await client.put(
            cluster.url + "/v1/stream/headers-fork",
            headers={"stream-forked-from": "/v1/stream/headers", "stream-fork-offset": "zz,&"},
        )
        assert response.status_code == 400
        response = await client.get(url, params={"offset": "not-an-offset"})
        assert response.status_code == 400
        response = await client.get(url, params={"offset": "-1", "live": "sometimes"})
        assert response.status_code == 400

    # Broken HTTP framing, sent raw.
    for request in [
        b"POST /v1/stream/headers HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n[1]",
        b"POST /v1/stream/headers HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"POST /v1/stream/headers HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        b"POST /v1/stream/headers HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2"
        b"\r\n\r\n[1]",
        b"GARBAGE\r\n\r\n",
    ]:
        status, reply = await trio.to_thread.run_sync(raw_request, cluster.url, request)
        assert status == 400, (request[:60], reply[:200])

    async with httpx.AsyncClient(timeout=10) as client:
        assert await content(client, url) == (200, ["one"])
        assert (await client.head(cluster.url + "/v1/stream/headers-new")).status_code == 404
        assert (await client.head(cluster.url + "/v1/stream/headers-fork")).status_code == 404
        producer = {"producer-id": "p", "producer-epoch": "0", "producer-seq": "1"}
        second = await client.post(
            url, headers={"content-type": JSON_TYPE, **producer}, content=b'["two"]'
        )
        assert second.status_code == 200  # the producer's state was not disturbed
        assert await content(client, url) == (200, ["one", "two"])
    assert_no_restarts(cluster, pids)
