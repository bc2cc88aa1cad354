"""Live fan-out scenario: many long-poll or SSE readers over a few streams, one steady writer.

The writer (in the bench process) appends text messages `m<seq>t<monotonic_ns>;` at a fixed
rate round-robin over the streams; readers (in worker processes, raw sockets) record, per
message, receive time minus the embedded send time (CLOCK_MONOTONIC is system-wide, so the
clocks agree across processes). Afterwards every reader must have seen exactly the
acknowledged messages of its stream: nothing lost, nothing twice.

Readers start at offset -1 on fresh streams and report ready once connected (SSE: once the
response head arrived); the writer starts when all are ready. When the writer is done it
sends each worker the last acknowledged sequence per stream; workers stop as soon as every
reader has it, or after a grace period.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from array import array
from typing import Any, cast

from .http import ResponseParser, SyncClient, Target, build_request
from .procs import _CTX, run_workers
from .stats import latency_summary


class _Reader(asyncio.Protocol):
    """One live reader; reconnects (from its last offset) if the server ends the response."""

    def __init__(self, w: _Worker, stream: int, path: str) -> None:
        self.w = w
        self.stream = stream
        self.path = path
        self.offset = "-1"
        self.cursor = ""
        self.seqs: list[int] = []
        self.last = -1
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.sse_buf = b""
        self.b64 = False
        self.ready = False

    # -- connection -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A connection from create_connection: its transport is a stream transport.
        self.transport = cast(asyncio.Transport, transport)
        if self.w.mode == "sse":
            self.parser = ResponseParser(on_body=self.sse_bytes, on_head=self.sse_head)
        else:
            self.parser = ResponseParser()
        self.request()

    def request(self) -> None:
        q = f"offset={self.offset}&live={'sse' if self.w.mode == 'sse' else 'long-poll'}"
        if self.cursor:
            q += f"&cursor={self.cursor}"
        assert self.transport is not None
        self.transport.write(build_request("GET", f"{self.path}?{q}", self.w.target))
        if self.w.mode != "sse":
            self.mark_ready()

    def mark_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.w.became_ready()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.w.stopping:
            self.w.reconnects += 1
            self.w.reconnect(self)

    # -- payload ----------------------------------------------------------------------
    def got_text(self, text: bytes) -> None:
        now = time.monotonic_ns()
        for msg in text.split(b";"):
            if not msg:
                continue
            seq_s, _, ts_s = msg[1:].partition(b"t")
            seq = int(seq_s)
            self.w.lat.append((now - int(ts_s)) / 1e6)
            self.seqs.append(seq)
            if seq > self.last:
                self.last = seq
        self.w.check_done()

    # -- long-poll --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        for resp in self.parser.feed(data):
            if self.w.mode == "sse":
                continue  # SSE response ended (server closed it); connection_lost follows
            if resp.status == 200:
                if resp.body:
                    self.got_text(resp.body)
            elif resp.status != 204:
                self.w.errors += 1
            self.offset = resp.headers.get("stream-next-offset", self.offset)
            self.cursor = resp.headers.get("stream-cursor", "")
            if resp.headers.get("connection", "").lower() == "close":
                assert self.transport is not None
                self.transport.close()
            elif not self.w.stopping:
                self.request()

    # -- SSE --------------------------------------------------------------------------
    def sse_head(self, resp: Any) -> None:
        if resp.status != 200:
            self.w.errors += 1
            return
        self.b64 = resp.headers.get("stream-sse-data-encoding", "") == "base64"
        self.mark_ready()

    def sse_bytes(self, data: bytes) -> None:
        self.sse_buf += data
        while True:
            end = self.sse_buf.find(b"\n\n")
            if end < 0:
                return
            event, self.sse_buf = self.sse_buf[:end], self.sse_buf[end + 2 :]
            kind = b"message"
            lines: list[bytes] = []
            for line in event.split(b"\n"):
                if line.startswith(b"event:"):
                    kind = line[6:].strip()
                elif line.startswith(b"data:"):
                    v = line[5:]
                    lines.append(v[1:] if v.startswith(b" ") else v)
            payload = b"\n".join(lines)
            if kind == b"data":
                if self.b64:
                    payload = base64.b64decode(payload.replace(b"\n", b""))
                self.got_text(payload)
            elif kind == b"control":
                ctl = json.loads(payload)
                self.offset = ctl.get("streamNextOffset", self.offset)
                self.cursor = ctl.get("streamCursor", "") or ""


class _Worker:
    def __init__(self, target: Target, mode: str, ready_q: Any) -> None:
        self.target = target
        self.mode = mode
        self.ready_q = ready_q
        self.readers: list[_Reader] = []
        self.lat = array("d")
        self.errors = 0
        self.reconnects = 0
        self.n_ready = 0
        self.stopping = False
        self.final: dict[int, int] | None = None
        self.all_done = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    def became_ready(self) -> None:
        self.n_ready += 1
        if self.n_ready == len(self.readers):
            self.ready_q.put(len(self.readers))

    def check_done(self) -> None:
        final = self.final
        if final is None:
            return
        if all(r.last >= final.get(r.stream, -1) for r in self.readers):
            self.all_done.set()

    def reconnect(self, reader: _Reader) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.target.connect(lambda: reader))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def fanout_worker(
    target: Target,
    mode: str,
    readers: list[tuple[int, str]],
    ready_q: Any,
    ctrl_q: Any,
    grace: float,
    max_wait: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    w = _Worker(target, mode, ready_q)
    w.readers = [_Reader(w, s, path) for s, path in readers]
    cpu0 = time.process_time()
    sem = asyncio.Semaphore(64)  # do not overflow the server's accept backlog

    async def connect(r: _Reader) -> None:
        async with sem:
            await target.connect(lambda: r)

    async with asyncio.TaskGroup() as tg:
        for r in w.readers:
            tg.create_task(connect(r))
    # The writer's final sequence numbers arrive on ctrl_q (None: abort).
    final = await asyncio.wait_for(loop.run_in_executor(None, ctrl_q.get), max_wait)
    if final is not None:
        w.final = final
        w.check_done()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.all_done.wait(), grace)
    w.stopping = True
    cpu = time.process_time() - cpu0
    for r in w.readers:
        if r.transport is not None:
            r.transport.close()
    return {
        "lat": w.lat.tobytes(),
        "seqs": [(r.stream, r.seqs) for r in w.readers],
        "errors": w.errors,
        "reconnects": w.reconnects,
        "load_cpu_s": cpu,
    }


def run_fanout(
    target: Target,
    run_id: str,
    tag: str,
    mode: str,
    readers: int,
    streams: int,
    rate: float,
    duration: float,
    processes: int,
) -> dict[str, Any]:
    """mode: "long-poll" or "sse"."""
    names = {s: f"bench-{run_id}-{tag}-{s}" for s in range(streams)}
    paths = {s: target.path(n) for s, n in names.items()}
    with SyncClient(target) as client:
        for path in paths.values():
            resp = client.request("PUT", path, headers={"content-type": "text/plain"})
            if resp.status not in (200, 201):
                raise RuntimeError(f"PUT {path}: HTTP {resp.status}")
    plan = [(i % streams, paths[i % streams]) for i in range(readers)]
    processes = max(1, min(processes, readers))
    ready_q = _CTX.Queue()
    ctrl_qs = [_CTX.Queue() for _ in range(processes)]
    max_wait = duration + 120
    args = [
        (target, mode, plan[i::processes], ready_q, ctrl_qs[i], 10.0, max_wait)
        for i in range(processes)
    ]
    acked: dict[int, list[int]] = {s: [] for s in range(streams)}
    writer: dict[str, Any] = {"errors": 0}

    def write() -> None:
        try:
            for _ in range(processes):
                ready_q.get(timeout=60)
        except Exception:
            for q in ctrl_qs:
                q.put(None)
            raise
        time.sleep(0.5)  # let the last requests reach the server
        ct = {"content-type": "text/plain"}
        seqs = [0] * streams
        n = int(rate * duration)
        with SyncClient(target) as client:
            t0 = time.monotonic()
            for i in range(n):
                if time.monotonic() > t0 + duration:
                    break  # a slow server gets fewer messages, never a longer run
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                s = i % streams
                seq = seqs[s]
                seqs[s] += 1
                body = b"m%dt%d;" % (seq, time.monotonic_ns())
                try:
                    resp = client.request("POST", paths[s], body, ct)
                    ok = 200 <= resp.status < 300
                except OSError:
                    ok = False
                if ok:
                    acked[s].append(seq)
                else:
                    writer["errors"] += 1
            writer["elapsed"] = time.monotonic() - t0
        final = {s: (v[-1] if v else -1) for s, v in acked.items()}
        for q in ctrl_qs:
            q.put(final)

    results = run_workers(fanout_worker, args, timeout=max_wait + 30, on_started=write)
    lat: list[float] = []
    lost = dups = delivered = 0
    expected = 0
    for r in results:
        a = array("d")
        a.frombytes(r["lat"])
        lat.extend(a)
        for s, seqs in r["seqs"]:
            want = acked[s]
            expected += len(want)
            delivered += len(seqs)
            got = set(seqs)
            dups += len(seqs) - len(got)
            lost += len(set(want) - got)
    return {
        **latency_summary(lat),
        "delivered": delivered,
        "expected": expected,
        "lost": lost,
        "duplicates": dups,
        "errors": sum(r["errors"] for r in results) + writer["errors"],
        "reconnects": sum(r["reconnects"] for r in results),
        # over the writer's schedule (duration), or longer if it fell behind: a writer that
        # kept its schedule shows exactly its rate
        "writer_rate": sum(map(len, acked.values())) / max(duration, writer.get("elapsed", 0.0)),
        "client_cpu_pct": 100.0 * sum(r["load_cpu_s"] for r in results) / duration,
    }
