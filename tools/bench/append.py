"""Append scenarios: many keep-alive connections POSTing small bodies, then a full read-back.

`run_append` creates the streams and hands the load to wrk (wrk.py) or to the Python driver
here: asyncio worker processes, one protocol object per connection. Under this driver every
body (bodies.py) is unique and derivable from (stream, connection, sequence), so the read-back
can be checked exactly: each stream must hold, per writing connection and in send order, exactly
the bodies that were acknowledged (2xx), byte for byte. A request whose outcome is unknown
(connection lost, 5xx, still in flight at the drain deadline) may be present or absent; a
request refused with a 4xx must be absent. Nothing else may appear.

Modes: "bytes" (100-byte application/octet-stream), "json" (one ~100-byte JSON object per
POST), "json10" (a JSON array of 10 such objects per POST; the server flattens it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from array import array
from typing import Any, cast

from .bodies import CONTENT_TYPES, body_bytes, expected, json_body, records
from .http import ResponseParser, SyncClient, Target
from .procs import cpu_seconds, run_workers
from .stats import cpu_us_per_op, latency_summary
from .wrk import DEFAULT_THREADS, run_wrk_append


class _Conn(asyncio.Protocol):
    """One keep-alive connection issuing appends back to back over its streams."""

    def __init__(self, gen: _Generator, cid: int, streams: list[tuple[int, str]]) -> None:
        self.gen = gen
        self.cid = cid
        self.streams = streams  # (stream index, path)
        self.heads = [
            (
                f"POST {path} HTTP/1.1\r\n{gen.target.head_lines}"
                f"content-type: {CONTENT_TYPES[gen.mode]}\r\ncontent-length: "
            ).encode()
            for _, path in streams
        ]
        self.seq = [0] * len(streams)
        self.turn = 0
        self.inflight: tuple[int, int] | None = None  # (stream slot, seq)
        self.sent_at = 0.0
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A connection from create_connection: its transport is a stream transport.
        self.transport = cast(asyncio.Transport, transport)
        self.parser = ResponseParser()

    def send_next(self) -> None:
        gen = self.gen
        if time.monotonic() >= gen.end_at:
            self.inflight = None
            self.finish()
            return
        slot = self.turn
        self.turn = (slot + 1) % len(self.streams)
        q = self.seq[slot]
        self.seq[slot] = q + 1
        s = self.streams[slot][0]
        if gen.mode in ("bytes", "sink"):
            body = body_bytes(s, self.cid, q)
        else:
            body = json_body(gen.mode, s, self.cid, q)
        self.inflight = (slot, q)
        self.sent_at = time.monotonic()
        assert self.transport is not None
        self.transport.write(self.heads[slot] + b"%d\r\n\r\n" % len(body) + body)

    def data_received(self, data: bytes) -> None:
        for resp in self.parser.feed(data):
            now = time.monotonic()
            gen = self.gen
            if self.inflight is None:
                continue
            slot, q = self.inflight
            s = self.streams[slot][0]
            gen.lat.append((now - self.sent_at) * 1000.0)
            if 200 <= resp.status < 300:
                gen.acked.setdefault((s, self.cid), []).append(q)
                if now <= gen.end_at:
                    gen.ok_in_window += 1
            else:
                gen.errors += 1
                gen.statuses[resp.status] = gen.statuses.get(resp.status, 0) + 1
                bucket = gen.refused if 400 <= resp.status < 500 else gen.doubt
                bucket.setdefault((s, self.cid), []).append(q)
            self.inflight = None
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inflight is not None:
            slot, q = self.inflight
            self.gen.doubt.setdefault((self.streams[slot][0], self.cid), []).append(q)
            self.gen.errors += 1
            self.gen.conn_errors += 1
            self.inflight = None
        self.finish()

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.gen.conn_done(self)


class _Generator:
    def __init__(self, target: Target, mode: str, end_at: float) -> None:
        self.target = target
        self.mode = mode
        self.end_at = end_at
        self.lat = array("d")
        self.acked: dict[tuple[int, int], list[int]] = {}
        self.refused: dict[tuple[int, int], list[int]] = {}
        self.doubt: dict[tuple[int, int], list[int]] = {}
        self.errors = 0
        self.conn_errors = 0
        self.ok_in_window = 0
        self.statuses: dict[int, int] = {}
        self.pending = 0
        self.all_done: asyncio.Event | None = None

    def conn_done(self, conn: _Conn) -> None:
        """A connection has stopped issuing requests (window over, or connection lost)."""
        self.pending -= 1
        if self.pending == 0 and self.all_done is not None:
            self.all_done.set()


async def append_worker(
    target: Target,
    mode: str,
    conns: list[tuple[int, list[tuple[int, str]]]],
    start_at: float,
    end_at: float,
    drain_s: float,
) -> dict[str, Any]:
    gen = _Generator(target, mode, end_at)
    gen.all_done = asyncio.Event()
    gen.pending = len(conns)
    protos: list[_Conn] = []
    transports = []
    for cid, streams in conns:
        tr, proto = await target.connect(functools.partial(_Conn, gen, cid, streams))
        # hold the first request until everyone starts together
        transports.append(tr)
        protos.append(proto)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = time.process_time()
    for p in protos:
        p.send_next()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gen.all_done.wait(), timeout=end_at - time.monotonic() + drain_s)
    cpu = time.process_time() - cpu0
    for p in protos:  # requests still in flight after the drain deadline: in doubt
        if p.inflight is not None:
            slot, q = p.inflight
            gen.doubt.setdefault((p.streams[slot][0], p.cid), []).append(q)
            gen.errors += 1
            p.inflight = None
    for tr in transports:
        tr.close()
    return {
        "lat": gen.lat.tobytes(),
        "acked": gen.acked,
        "refused": gen.refused,
        "doubt": gen.doubt,
        "errors": gen.errors,
        "conn_errors": gen.conn_errors,
        "ok_in_window": gen.ok_in_window,
        "statuses": gen.statuses,
        "load_cpu_s": cpu,
    }


def verify(
    target: Target,
    mode: str,
    names: dict[int, str],
    acked: dict[tuple[int, int], list[int]],
    refused: dict[tuple[int, int], list[int]],
    doubt: dict[tuple[int, int], list[int]],
) -> dict[str, Any]:
    """Read every stream back and compare it with what was acknowledged."""
    problems: list[str] = []
    checked = 0
    with SyncClient(target) as client:
        for s, name in names.items():
            found = records(mode, client.read_chunks(target.path(name)))
            by_writer: dict[int, list[int]] = {}
            for rec in found:
                if rec[0] in ("torn", "garbage") or rec[0] != s:
                    problems.append(f"stream {s}: foreign or broken record {str(rec)[:80]}")
                    continue
                _, c, q, payload = rec
                if payload != expected(mode, s, c, q):
                    problems.append(f"stream {s}: record (c={c}, q={q}) differs")
                by_writer.setdefault(c, []).append(q)
                checked += 1
            writers = {c for (ss, c) in acked if ss == s} | set(by_writer)
            for c in writers:
                got = by_writer.get(c, [])
                want = acked.get((s, c), [])
                if mode == "json10":
                    want = [q * 10 + j for q in want for j in range(10)]
                maybe = set(doubt.get((s, c), []))
                if mode == "json10":
                    maybe = {q * 10 + j for q in maybe for j in range(10)}
                if got == want:
                    continue
                if any(b <= a for a, b in zip(got, got[1:], strict=False)):
                    problems.append(f"stream {s} writer {c}: duplicated or reordered records")
                missing = set(want) - set(got)
                extra = set(got) - set(want) - maybe
                if missing:
                    problems.append(f"stream {s} writer {c}: {len(missing)} acked records lost")
                if extra:
                    problems.append(f"stream {s} writer {c}: {len(extra)} unacked records")
    return {"records_checked": checked, "problems": problems[:20], "problem_count": len(problems)}


def setup_streams(target: Target, stem: str, count: int, mode: str) -> dict[int, str]:
    """Create streams `stem`0 .. `stem`{count-1}; their names by index."""
    names = {s: f"{stem}{s}" for s in range(count)}
    if mode == "sink":
        return names
    with SyncClient(target) as client:
        for name in names.values():
            resp = client.request(
                "PUT", target.path(name), headers={"content-type": CONTENT_TYPES[mode]}
            )
            if resp.status not in (200, 201):
                raise RuntimeError(f"PUT {name}: HTTP {resp.status} {resp.body[:200]!r}")
    return names


def run_append(
    target: Target,
    run_id: str,
    tag: str,
    mode: str,
    connections: int,
    streams: int,
    duration: float,
    processes: int,
    verify_data: bool = True,
    pids: list[int] | None = None,
    driver: str = "python",
    wrk_threads: int = DEFAULT_THREADS,
) -> dict[str, Any]:
    """Run one append scenario against one server and return its metrics; `driver` "wrk"
    runs the load under wrk (wrk.py), "python" in `processes` worker processes.

    With the server's `pids`, their CPU is also read at the start and the end of the
    measured window: CPU per acknowledged append, without setup and read-back."""
    stem = f"bench-{run_id}-{tag}-"
    names = setup_streams(target, stem, streams, mode)
    if driver == "wrk":
        return run_wrk_append(
            target, stem, names, mode, connections, duration, wrk_threads, verify_data, pids or []
        )
    # Connection c writes streams c, c+C, c+2C, ... (or stream c % S when S < C).
    plan: list[tuple[int, list[tuple[int, str]]]] = []
    for c in range(connections):
        owned = list(range(c, streams, connections)) or [c % streams]
        plan.append((c, [(s, target.path(names[s])) for s in owned]))
    processes = max(1, min(processes, connections))
    start_at = time.monotonic() + 1.5  # spawned interpreters need a moment to start
    end_at = start_at + duration
    args = [(target, mode, plan[i::processes], start_at, end_at, 10.0) for i in range(processes)]
    window: list[float] = []

    def measure_window() -> None:
        for at in (start_at, end_at):
            time.sleep(max(0.0, at - time.monotonic()))
            window.append(sum(cpu_seconds(p) for p in pids or []))

    results = run_workers(
        append_worker, args, timeout=duration + 60, on_started=measure_window if pids else None
    )
    lat: list[float] = []
    acked: dict[tuple[int, int], list[int]] = {}
    refused: dict[tuple[int, int], list[int]] = {}
    doubt: dict[tuple[int, int], list[int]] = {}
    errors = ok = 0
    statuses: dict[int, int] = {}
    client_cpu = 0.0
    for r in results:
        a = array("d")
        a.frombytes(r["lat"])
        lat.extend(a)
        acked.update(r["acked"])
        refused.update(r["refused"])
        doubt.update(r["doubt"])
        errors += r["errors"]
        ok += r["ok_in_window"]
        client_cpu += r["load_cpu_s"]
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    metrics: dict[str, Any] = {
        "requests_per_s": ok / duration,
        **latency_summary(lat),
        "errors": errors,
        "client_cpu_pct": 100.0 * client_cpu / duration,
        "append_driver": "python",
    }
    if len(window) == 2 and ok:
        metrics["server_cpu_ms_per_request"] = 1000.0 * (window[1] - window[0]) / ok
        metrics["server_cpu_us_per_append"] = cpu_us_per_op(window[1] - window[0], ok)
        metrics["server_cpu_pct"] = 100.0 * (window[1] - window[0]) / duration
    if mode == "json10":
        metrics["messages_per_s"] = ok * 10 / duration
    if statuses:
        metrics["statuses"] = {str(k): v for k, v in statuses.items()}
    if verify_data and mode != "sink":
        v = verify(target, mode, names, acked, refused, doubt)
        metrics["verified_records"] = v["records_checked"]
        metrics["verify_problems"] = v["problem_count"]
        if v["problems"]:
            metrics["verify_examples"] = v["problems"]
    return metrics
