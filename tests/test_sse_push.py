"""SSE sessions at their stream's tail, served by the commit's own task (`shard.live_sse`):
every message once and in order, ended right by closure and deletion, and held to the
connection's high-water mark when the gateway does not read, without stalling others."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import trio
from support.auth import open_authenticated, secret_args
from support.cluster import running_cluster
from support.processes import ShardProcess
from test_fanout import SseReader

from ds_cluster.common import wire

TEXT = {"content-type": "text/plain"}
BYTES = "application/octet-stream"
MIB = 1024 * 1024


async def test_pushed_sessions_get_every_message_once_in_order_and_end_right(
    tmp_path: Path,
) -> None:
    # Three streams written at once (commits carry several streams' writes, some several
    # of one stream's), each read by two SSE sessions on its shard (two queries): every
    # reader gets its stream's messages once, in order. A fork of one is read through its
    # source, then live. Then one stream is closed, one deleted, and the third goes on.
    count = 60
    names = ["p0", "p1", "p2"]
    async with (
        running_cluster(tmp_path, shards=2, sse_max_duration=120) as cluster,
        httpx.AsyncClient(base_url=f"{cluster.url}/v1/stream/", timeout=60) as client,
    ):
        for name in names:
            r = await client.put(name, headers=TEXT)
            assert r.status_code == 201
        tail = r.headers["stream-next-offset"]  # (of an empty stream: every stream's)
        path = "/v1/stream/"
        readers = {
            name: [
                SseReader(cluster.url, path + name, "offset=-1&live=sse"),
                SseReader(cluster.url, path + name, f"offset={tail}&live=sse"),
            ]
            for name in names
        }
        want = {name: "".join(f"{name}-{n};" for n in range(count)) for name in names}

        async def write(name: str) -> None:
            for n in range(count):
                r = await client.post(name, content=f"{name}-{n};".encode(), headers=TEXT)
                assert r.status_code == 204
                if n % 10 == 0:
                    await trio.sleep(0.05)  # some messages find their sessions parked

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(write, name)
            for name in names:
                for reader in readers[name]:
                    got = await trio.to_thread.run_sync(reader.text_until, want[name], 60)
                    assert got == want[name]

            # A fork of p2: its session reads p2's records from p2's shard first (its
            # task does), then is pushed the fork's own appends.
            r = await client.put("p2f", headers={"stream-forked-from": f"{path}p2"})
            assert r.status_code == 201, r.text
            fork_reader = SseReader(cluster.url, path + "p2f", "offset=-1&live=sse")
            got = await trio.to_thread.run_sync(fork_reader.text_until, want["p2"], 60)
            assert got == want["p2"]
            for n in range(5):
                r = await client.post("p2f", content=f"f{n};".encode(), headers=TEXT)
                assert r.status_code == 204
            forked = want["p2"] + "".join(f"f{n};" for n in range(5))
            got = await trio.to_thread.run_sync(fork_reader.text_until, forked, 60)
            assert got == forked
            fork_reader.close()

            r = await client.post("p0", headers={**TEXT, "stream-closed": "true"})
            assert r.status_code == 204
            r = await client.delete("p1")
            assert r.status_code == 204
            r = await client.post("p2", content=b"more;", headers=TEXT)
            assert r.status_code == 204

            def ended(reader: SseReader) -> bytes:
                while not reader.ended:
                    reader.read_chunk()
                return reader.body

            for reader in readers["p0"]:
                body = await trio.to_thread.run_sync(ended, reader)
                assert b'"streamClosed":true' in body.rsplit(b"event: control", 1)[1]
                assert reader.text() == want["p0"]
            for reader in readers["p1"]:  # deleted: the response ends (the client sees 404)
                await trio.to_thread.run_sync(ended, reader)
                assert reader.text() == want["p1"]
            for reader in readers["p2"]:
                got = await trio.to_thread.run_sync(reader.text_until, want["p2"] + "more;", 60)
                assert got == want["p2"] + "more;"
                assert not reader.ended
        for sessions in readers.values():
            for reader in sessions:
                reader.close()


def _request(call_id: int, method: str, path: str, query: str = "", body: bytes = b"") -> bytes:
    return wire.encode(
        {
            "k": "req",
            "i": call_id,
            "r": 1,
            "op": "http",
            "m": method,
            "p": path,
            "q": query,
            "h": [["content-type", BYTES]],
            "b": body,
        }
    )


class Link:
    """An authenticated shard connection, as a gateway's: frames in, frames out."""

    def __init__(self, stream: trio.SocketStream, decoder: wire.FrameDecoder) -> None:
        self.stream = stream
        self.decoder = decoder
        self.frames: list[wire.Frame] = []

    async def next(self, timeout: float = 10) -> wire.Frame:
        with trio.fail_after(timeout):
            while not self.frames:
                data = await self.stream.receive_some(MIB)
                assert data, "the shard closed the connection"
                self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def call(self, frame: bytes) -> wire.Frame:
        await self.stream.send_all(frame)
        return await self.next()


def _sse_data(body: bytes) -> bytes:
    """The data a base64 SSE body carries."""
    out = []
    for event in body.split(b"\n\n"):
        if event.startswith(b"event: data\n"):
            out.append(base64.b64decode(event.split(b"\ndata:", 1)[1]))
    return b"".join(out)


async def test_a_link_that_does_not_read_bounds_the_shard_and_stalls_no_other_reader(
    tmp_path: Path,
) -> None:
    # 16 SSE sessions of one stream on a connection that reads nothing while 6 MiB are
    # appended (8 MiB of base64 events for each, 128 MiB in all): the shard queues no more
    # for it than the connection's high-water mark and a chunk per session, a live
    # reader on another connection gets every message meanwhile, and once the first
    # connection reads, each of its sessions gets the whole stream, in order.
    shard = ShardProcess(tmp_path, "shard-0", *secret_args(tmp_path))
    try:
        stream, decoder, _ = await open_authenticated(shard.address, "shard-0")
        link = Link(stream, decoder)
        for call_id, name in enumerate(("big", "small"), 1):
            assert (await link.call(_request(call_id, "PUT", name)))["s"] == 201
        # the other reader, on this connection
        assert (await link.call(_request(3, "GET", "small", "offset=-1&live=sse")))["s"] == 200
        first = await link.next()
        assert first["k"] == "chunk" and first["i"] == 3

        unread_stream, unread_decoder, _ = await open_authenticated(shard.address, "shard-0")
        sessions = range(100, 116)
        await unread_stream.send_all(
            b"".join(_request(i, "GET", "big", "offset=-1&live=sse") for i in sessions)
        )
        await trio.sleep(0.5)  # (the sessions send their heads and park at the tail)
        before = shard.status_kib("VmRSS")
        record = bytes(range(256)) * 256  # 64 KiB: one record, kept in memory for readers
        started = time.monotonic()
        with trio.fail_after(60):
            for n in range(24):
                posts = [_request(200 + 4 * n + k, "POST", "big", body=record) for k in range(4)]
                posts.append(_request(300 + n, "POST", "small", body=b"%d;" % n))
                await stream.send_all(b"".join(posts))
                answered = 0
                small = b""
                while answered < 5 or b"event: data" not in small:  # the 204s, the event
                    frame = await link.next()
                    if frame["k"] == "res":
                        assert frame["s"] == 204, frame
                        answered += 1
                    else:
                        assert frame["k"] == "chunk" and frame["i"] == 3, frame
                        small += frame["b"]
                assert _sse_data(small) == b"%d;" % n
        took = time.monotonic() - started
        growth = (shard.status_kib("VmHWM") - before) / 1024
        print(f"6 MiB appended in {took:.1f} s; the shard's peak RSS grew {growth:.0f} MiB")
        assert took < 12, "the unread connection is dropped after 15 s"
        assert growth < 48, f"RSS grew {growth:.0f} MiB"

        reader = Link(unread_stream, unread_decoder)
        got = {i: bytearray() for i in sessions}
        want = record * 96
        with trio.fail_after(60):
            while any(len(data) < len(want) for data in got.values()):
                frame = await reader.next()
                if frame["k"] == "chunk":  # (whole events: a chunk is one step's)
                    got[frame["i"]] += _sse_data(frame["b"])
                else:
                    assert frame["k"] == "res" and frame["s"] == 200, frame
        assert all(data == want for data in got.values())
        await trio.aclose_forcefully(unread_stream)
        await trio.aclose_forcefully(stream)
    finally:
        shard.stop()
