"""Catch-up read scenario: GET ?offset=-1 of 1 MiB streams, following Stream-Next-Offset.

Readers loop over the prepared streams; every full pass is compared with the bytes written
(so a fast-but-wrong server cannot win). Throughput counts only verified passes' bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from typing import Any, cast

from .http import ResponseParser, SyncClient, Target
from .procs import run_workers

CHUNK = 64 * 1024


def stream_content(s: int, size: int) -> bytes:
    """Deterministic, incompressible-looking content of stream s."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.blake2b(b"%d:%d" % (s, block), digest_size=64).digest() * 16
        block += 1
    return bytes(out[:size])


class _Reader(asyncio.Protocol):
    def __init__(
        self, target: Target, paths: list[tuple[int, str]], size: int, end_at: float
    ) -> None:
        self.head_lines = target.head_lines
        self.paths = paths
        self.size = size
        self.end_at = end_at
        self.turn = 0
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.current: tuple[int, str] = paths[0]
        self.parts: list[bytes] = []
        self.bytes_ok = 0
        self.passes = 0
        self.bad = 0
        self.requests = 0
        self.expected: dict[int, bytes] = {}
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A connection from create_connection: its transport is a stream transport.
        self.transport = cast(asyncio.Transport, transport)

    def start_pass(self) -> None:
        if time.monotonic() >= self.end_at:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.current = self.paths[self.turn % len(self.paths)]
        self.turn += 1
        self.parts = []
        self.get("-1")

    def get(self, offset: str) -> None:
        assert self.transport is not None
        self.requests += 1
        self.transport.write(
            f"GET {self.current[1]}?offset={offset} HTTP/1.1\r\n{self.head_lines}\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        for resp in self.parser.feed(data):
            if resp.status != 200:
                self.bad += 1
                self.start_pass()
                continue
            self.parts.append(resp.body)
            if resp.headers.get("stream-up-to-date") == "true" or not resp.body:
                s = self.current[0]
                content = b"".join(self.parts)
                want = self.expected.get(s)
                if want is None:
                    want = self.expected[s] = stream_content(s, self.size)
                if content == want:
                    self.passes += 1
                    if time.monotonic() <= self.end_at:
                        self.bytes_ok += len(content)
                else:
                    self.bad += 1
                self.start_pass()
            else:
                self.get(resp.headers["stream-next-offset"])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.bad += 1
            self.done.set_result(None)


async def catchup_worker(
    target: Target,
    readers: list[list[tuple[int, str]]],
    size: int,
    start_at: float,
    end_at: float,
) -> dict[str, Any]:
    protos: list[_Reader] = []
    for paths in readers:
        _, proto = await target.connect(functools.partial(_Reader, target, paths, size, end_at))
        protos.append(proto)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = time.process_time()
    for p in protos:
        p.start_pass()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(p.done for p in protos)), end_at - time.monotonic() + 30
        )
    cpu = time.process_time() - cpu0
    for p in protos:
        if p.transport is not None:
            p.transport.close()
    return {
        "bytes": sum(p.bytes_ok for p in protos),
        "passes": sum(p.passes for p in protos),
        "bad": sum(p.bad for p in protos),
        "requests": sum(p.requests for p in protos),
        "load_cpu_s": cpu,
    }


def run_catchup(
    target: Target,
    run_id: str,
    tag: str,
    streams: int,
    size: int,
    readers: int,
    duration: float,
    processes: int,
) -> dict[str, Any]:
    names = {s: f"bench-{run_id}-{tag}-{s}" for s in range(streams)}
    with SyncClient(target) as client:
        for s, name in names.items():
            path = target.path(name)
            ct = {"content-type": "application/octet-stream"}
            resp = client.request("PUT", path, headers=ct)
            if resp.status not in (200, 201):
                raise RuntimeError(f"PUT {name}: HTTP {resp.status}")
            content = stream_content(s, size)
            for i in range(0, size, CHUNK):
                resp = client.request("POST", path, content[i : i + CHUNK], ct)
                if not 200 <= resp.status < 300:
                    raise RuntimeError(f"POST {name}: HTTP {resp.status}")
    paths = [(s, target.path(n)) for s, n in names.items()]
    plan = [paths[i % streams :] + paths[: i % streams] for i in range(readers)]
    processes = max(1, min(processes, readers))
    start_at = time.monotonic() + 1.5
    end_at = start_at + duration
    args = [(target, plan[i::processes], size, start_at, end_at) for i in range(processes)]
    results = run_workers(catchup_worker, args, timeout=duration + 90)
    total = sum(r["bytes"] for r in results)
    return {
        "mb_per_s": total / duration / 1e6,
        "passes": sum(r["passes"] for r in results),
        "requests_per_pass": sum(r["requests"] for r in results)
        / max(1, sum(r["passes"] for r in results)),
        "errors": sum(r["bad"] for r in results),
        "client_cpu_pct": 100.0 * sum(r["load_cpu_s"] for r in results) / duration,
    }
