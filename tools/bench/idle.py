"""Idle connections scenario: how many open SSE connections the server holds, at what memory.

Client workers open N SSE connections (spread over a few streams, at the tail, so they stay
idle), each counted once its 200 response head has arrived. The server's resident memory
(sum over its processes; see procs.server_pids) is sampled before and while they are held;
the difference divided by the connections held is the per-connection cost. After the hold
period the bench counts how many are still open.

Each client process is limited by its open-file hard limit (ulimit -Hn), so the count is
spread over enough processes. The server needs the same: one process holding 20,000
connections needs a hard limit above 20,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from typing import Any, cast

from .http import ResponseParser, SyncClient, Target, build_request
from .procs import _CTX, rss_kib, run_workers


class _Idle(asyncio.Protocol):
    def __init__(self, w: _IdleWorker, path: str) -> None:
        self.w = w
        self.path = path
        self.open = False
        self.parser = ResponseParser(on_body=lambda _b: None, on_head=self.head)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A connection from create_connection: its transport is a stream transport.
        stream = cast(asyncio.Transport, transport)
        stream.write(build_request("GET", f"{self.path}?offset=-1&live=sse", self.w.target))
        self.w.transports.append(transport)

    def head(self, resp: Any) -> None:
        if resp.status == 200:
            self.open = True
            self.w.opened += 1
        else:
            self.w.refused += 1
        self.w.progress()

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.open = False
            self.w.dropped += 1
        elif not self.w.closing:
            self.w.failed += 1
            self.w.progress()


class _IdleWorker:
    def __init__(self, target: Target, count: int) -> None:
        self.target = target
        self.count = count
        self.opened = self.refused = self.failed = self.dropped = 0
        self.closing = False
        self.transports: list[asyncio.BaseTransport] = []
        self.settled = asyncio.Event()

    def progress(self) -> None:
        if self.opened + self.refused + self.failed >= self.count:
            self.settled.set()


async def idle_worker(
    target: Target,
    paths: list[str],
    count: int,
    ready_q: Any,
    ctrl_q: Any,
    timeout: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    w = _IdleWorker(target, count)
    sem = asyncio.Semaphore(128)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    t0 = time.monotonic()

    async def one(i: int) -> None:
        async with sem:
            try:
                # bounded: a server out of file descriptors leaves SYNs unanswered, and the
                # kernel's connect retries would otherwise outlast the whole open phase
                connect = target.connect(lambda: _Idle(w, paths[i % len(paths)]))
                await asyncio.wait_for(connect, max(0.1, t0 + timeout - time.monotonic()))
            except (OSError, TimeoutError):
                w.failed += 1
                w.progress()

    async with asyncio.TaskGroup() as tg:
        for i in range(min(count, limit - 32)):
            tg.create_task(one(i))
    if count > limit - 32:
        w.failed += count - (limit - 32)
        w.progress()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(w.settled.wait(), max(0.1, t0 + timeout - time.monotonic()))
    open_time = time.monotonic() - t0
    ready_q.put(w.opened)
    await loop.run_in_executor(None, ctrl_q.get)  # hold until the bench has measured
    still_open = w.opened - w.dropped
    w.closing = True
    for tr in w.transports:
        tr.close()
    return {
        "opened": w.opened,
        "refused": w.refused,
        "failed": w.failed,
        "still_open": still_open,
        "open_s": open_time,
        "load_cpu_s": 0.0,
    }


def run_idle(
    target: Target,
    run_id: str,
    tag: str,
    connections: int,
    hold: float,
    pids: list[int],
    per_process: int = 15000,
) -> dict[str, Any]:
    """Open `connections` idle SSE connections, hold them `hold` seconds, measure server RSS."""
    names = [f"bench-{run_id}-{tag}-{s}" for s in range(10)]
    with SyncClient(target) as client:
        for name in names:
            resp = client.request("PUT", target.path(name), headers={"content-type": "text/plain"})
            if resp.status not in (200, 201):
                raise RuntimeError(f"PUT {name}: HTTP {resp.status}")
    paths = [target.path(n) for n in names]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per = max(1, min(per_process, hard - 100))
    processes = max(1, -(-connections // per))
    counts = [
        connections // processes + (1 if i < connections % processes else 0)
        for i in range(processes)
    ]
    ready_q = _CTX.Queue()
    ctrl_qs = [_CTX.Queue() for _ in range(processes)]
    open_timeout = 30.0 + connections / 500
    before = {pid: rss_kib(pid) for pid in pids}
    measured: dict[str, Any] = {}

    def measure() -> None:
        opened = 0
        try:
            for _ in range(processes):
                opened += ready_q.get(timeout=open_timeout + 30)
            time.sleep(1.0)  # let the server settle its buffers
            during = {pid: rss_kib(pid) for pid in pids}
            time.sleep(hold)
            measured["opened"] = opened
            measured["during"] = during
        finally:
            for q in ctrl_qs:
                q.put(None)

    args = [(target, paths, counts[i], ready_q, ctrl_qs[i], open_timeout) for i in range(processes)]
    results = run_workers(idle_worker, args, timeout=open_timeout + hold + 120, on_started=measure)
    opened = sum(r["opened"] for r in results)
    still = sum(r["still_open"] for r in results)
    during = measured.get("during", {})
    delta = sum(during.get(p, 0) - before.get(p, 0) for p in pids)
    return {
        "requested": connections,
        "opened": opened,
        "held": still,
        # refused, failed, or still not open when the open phase ended
        "open_failures": connections - opened,
        "rss_before_kib": sum(before.values()),
        "rss_held_kib": sum(during.values()),
        "rss_kib_by_pid": {p: (before.get(p, 0), during.get(p, 0)) for p in pids},
        "kib_per_conn": delta / opened if opened and pids else float("nan"),
        "open_s": max((r["open_s"] for r in results), default=0.0),
        "server_pids": len(pids),
    }
