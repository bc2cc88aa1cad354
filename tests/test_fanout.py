"""Shared SSE upstreams (gateway/fanout.py) against a real cluster and raw sockets.

Many clients reading the same SSE share one shard call; a late joiner gets what it would
have read on its own; `offset=now` is never shared; a client that stops reading is
dropped without holding up the others; the last client leaving ends the shard call.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import trio
from support.cluster import running_cluster

TEXT = "text/plain"


class SseReader:
    """A raw HTTP/1.1 SSE reader: the exact bytes, the events, and the end of the body."""

    def __init__(self, url: str, path: str, query: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(f"GET {path}?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.lower()
        self.body = b""  # de-chunked
        self.ended = False

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        head, _, self.buf = self.buf.partition(marker)
        return head

    def read_chunk(self) -> bytes:
        size = int(self._until(b"\r\n"), 16)
        while len(self.buf) < size + 2:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        chunk, self.buf = self.buf[:size], self.buf[size + 2 :]
        if size == 0:
            self.ended = True
        self.body += chunk
        return chunk

    def text_until(self, expected: str, timeout: float = 10) -> str:
        """Read until the stream's text (all data events joined) is at least as long as
        `expected`; return it. (A text stream's catch-up may merge appends into one event,
        so the joined text is what two readers can be compared on.)"""
        deadline = time.monotonic() + timeout
        while len(self.text()) < len(expected):
            assert time.monotonic() < deadline, self.body
            self.read_chunk()
        return self.text()

    def text(self) -> str:
        return "".join(self.data())

    def data(self) -> list[str]:
        events = self.body.split(b"\n\n")
        out = []
        for event in events:
            lines = event.split(b"\n")
            if b"event: data" in lines:
                out += [_field(line) for line in lines if line.startswith(b"data:")]
        return out

    def close(self) -> None:
        self.sock.close()


def _field(line: bytes) -> str:
    """An SSE field's value: after the colon and one optional space."""
    value = line.split(b":", 1)[1]
    return (value[1:] if value.startswith(b" ") else value).decode()


def append(url: str, path: str, text: str) -> None:
    r = httpx.post(url + path, content=text.encode(), headers={"content-type": TEXT})
    assert r.status_code == 204, r.text


@pytest.fixture
async def one_shard(tmp_path):
    async with running_cluster(tmp_path, shards=1, sse_max_duration=60) as cluster:
        yield cluster


def create(url: str, path: str) -> None:
    r = httpx.put(url + path, headers={"content-type": TEXT})
    assert r.status_code in (200, 201), r.text


async def test_late_joiner_reads_what_it_would_alone(one_shard) -> None:
    url, path = one_shard.url, "/v1/stream/shared"

    def scenario() -> None:
        create(url, path)
        append(url, path, "a")
        early = SseReader(url, path, "offset=-1&live=sse")
        assert early.status == 200 and b"text/event-stream" in early.head
        assert early.text_until("a") == "a"
        append(url, path, "b")
        assert early.text_until("ab") == "ab"
        late = SseReader(url, path, "offset=-1&live=sse")  # joins: replay of a and b
        append(url, path, "c")
        assert late.text_until("abc") == "abc"
        assert late.data() == ["a", "b", "c"]  # the replay: the early reader's events
        assert early.text_until("abc") == "abc"
        alone = SseReader(url, path, "offset=-1&live=sse&cursor=x")  # another key
        assert alone.text_until("abc") == "abc"
        assert alone.data() == ["abc"]  # its own catch-up: one event
        for reader in (early, late, alone):
            reader.close()

    await trio.to_thread.run_sync(scenario)


async def test_offset_now_is_not_shared(one_shard) -> None:
    url, path = one_shard.url, "/v1/stream/now"

    def scenario() -> None:
        create(url, path)
        first = SseReader(url, path, "offset=now&live=sse")
        first.read_chunk()  # its start (a control event)
        append(url, path, "before|")
        assert first.text_until("before|") == "before|"
        second = SseReader(url, path, "offset=now&live=sse")
        second.read_chunk()
        append(url, path, "after|")
        assert second.text_until("after|") == "after|"  # nothing from before its "now"
        assert first.text_until("before|after|") == "before|after|"
        first.close()
        second.close()

    await trio.to_thread.run_sync(scenario)


async def test_stalled_client_is_dropped_others_get_everything(one_shard) -> None:
    url, path = one_shard.url, "/v1/stream/stall"
    big = "x" * 60_000

    def scenario() -> None:
        create(url, path)
        stalled = SseReader(url, path, "offset=-1&live=sse")
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = SseReader(url, path, "offset=-1&live=sse")
        count = 40  # 2.4 MB: more than a stalled client may lag
        expected = ""
        for n in range(count):
            message = f"{n}:{big}|"
            append(url, path, message)
            expected += message
            if n % 4 == 0:
                assert reader.text_until(expected) == expected
        assert reader.text_until(expected, timeout=30) == expected
        # The stalled client's connection was closed by the gateway: reading it to the
        # end reaches EOF without a clean end of the chunked body.
        stalled.sock.settimeout(10)
        with pytest.raises(EOFError):
            while True:
                stalled.read_chunk()
                assert not stalled.ended
        reader.close()

    await trio.to_thread.run_sync(scenario)


async def test_many_clients_one_stream_then_all_leave(one_shard) -> None:
    url, path = one_shard.url, "/v1/stream/many"

    def scenario() -> None:
        create(url, path)
        readers = [SseReader(url, path, "offset=-1&live=sse") for _ in range(50)]
        for n in range(5):
            append(url, path, f"m{n}")
        for reader in readers:
            assert reader.text_until("m0m1m2m3m4") == "m0m1m2m3m4"
        for reader in readers:
            reader.close()
        # Everyone left: the upstream ends, and a new reader starts a fresh one.
        time.sleep(0.3)
        fresh = SseReader(url, path, "offset=-1&live=sse")
        append(url, path, "m5")
        assert fresh.text_until("m0m1m2m3m4m5") == "m0m1m2m3m4m5"
        fresh.close()

    await trio.to_thread.run_sync(scenario)


async def test_stream_closed_ends_every_response_cleanly(one_shard) -> None:
    url, path = one_shard.url, "/v1/stream/closing"

    def scenario() -> None:
        create(url, path)
        readers = [SseReader(url, path, "offset=-1&live=sse") for _ in range(3)]
        append(url, path, "last")
        r = httpx.post(url + path, headers={"content-type": TEXT, "stream-closed": "true"})
        assert r.status_code == 204, r.text
        for reader in readers:
            while not reader.ended:
                reader.read_chunk()
            assert reader.text() == "last"
            control = [e for e in reader.body.split(b"\n\n") if b"event: control" in e][-1]
            payload = json.loads(_field(control.split(b"\n")[-1]))
            assert payload.get("streamClosed") is True
            reader.close()

    await trio.to_thread.run_sync(scenario)
