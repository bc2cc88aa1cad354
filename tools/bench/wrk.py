"""The append scenarios driven by wrk (C, LuaJIT), so the load generator leaves the CPU to
the servers under test: at 64 connections the Python workers of append.py spend 46-107 µs
of CPU per append (about 0.6 of a 2-core machine at 8,000 appends/s), wrk at 2 threads
13-34 µs (runs on a shared, busy machine).

The load has the Python driver's shape: `connections` keep-alive connections, `streams`
streams, one request in flight per connection, 100-byte unique bodies (or the JSON modes'
messages), the target's content type and extra headers. wrk's threads split the
connections evenly (`-t T -c C`: C / T each); thread t writes its own share of the
streams round robin (append.lua). A thread's connections share one Lua state and wrk does
not tie a response to its request, so bodies are numbered per thread and the read-back is
checked by verify_seq.py (its docstring says what that proves). With one connection per
thread (`--wrk-threads` equal to the connections) the check is exact per connection, as
the Python driver's, but wrk then spends 50-58 µs per append against 20-25 µs at 2
threads in the same runs; every check that catches loss, duplication, corruption and
foreign bodies holds at any thread count, so 2 is the default.

Measured: appends acknowledged (2xx) over wrk's own run time, p50 / p99 latency from wrk's
histogram, errors (non-2xx, socket errors, timeouts beyond 10 s; any of them fails the
run, since the read-back can then only be checked by counts), wrk's CPU from the rusage
of the child (client_cpu_pct), and the servers' CPU from /proc over wrk's lifetime.

wrk does not verify TLS certificates: for https targets the stream setup and the
read-back, which run on the verifying client of http.py, prove the server's identity.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .bodies import CONTENT_TYPES
from .http import Target
from .procs import cpu_seconds
from .stats import cpu_us_per_op
from .verify_seq import ThreadCounts, verify

DEFAULT_THREADS = 2
SCRIPT = Path(__file__).with_name("append.lua")


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def choose_driver(choice: str | None) -> str:
    """'wrk' or 'python': the one asked for, else wrk when it is on PATH."""
    if choice == "wrk" and wrk_binary() is None:
        raise SystemExit("--append-driver wrk: wrk is not on PATH")
    if choice:
        return choice
    if wrk_binary() is not None:
        return "wrk"
    print(
        "# wrk is not on PATH: the append scenarios run on the Python driver, whose CPU "
        "competes with the servers' (install wrk, or --append-driver python to silence this)",
        file=sys.stderr,
    )
    return "python"


def thread_count(connections: int, wanted: int) -> int:
    """The most threads, up to `wanted`, that split the connections evenly (wrk gives each
    thread connections // threads and drops the rest)."""
    return next(t for t in range(max(1, min(wanted, connections)), 0, -1) if connections % t == 0)


def _lua_string(text: str) -> str:
    """A Lua string literal of `text`'s UTF-8 bytes (decimal escapes: nothing to break out)."""
    return (
        '"'
        + "".join(chr(b) if b < 128 and chr(b).isalnum() else f"\\{b:03d}" for b in text.encode())
        + '"'
    )


def script_text(target: Target, stem: str, streams: int, threads: int, mode: str) -> str:
    """append.lua behind its parameters (the headers may hold a token: never on argv)."""
    params = {
        "HEAD_LINES": _lua_string(target.head_lines),
        "PREFIX": _lua_string(target.path(stem)),
        "STREAMS": str(streams),
        "THREADS": str(threads),
        "MODE": _lua_string(mode),
        "CONTENT_TYPE": _lua_string(CONTENT_TYPES[mode]),
    }
    head = "".join(f"{k} = {v}\n" for k, v in params.items())
    return head + SCRIPT.read_text()


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """Run wrk; its exit code, output and CPU seconds (the rusage of that child alone)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    assert proc.stdout is not None
    try:
        with proc.stdout as pipe:  # to the end: wrk has exited
            out = pipe.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
    return proc.returncode, out, usage.ru_utime + usage.ru_stime


def _parse(out: str) -> tuple[list[int], list[int], dict[int, ThreadCounts]]:
    """done()'s lines: summary (duration µs, connect, read, write, timeout, status errors),
    latency (p50, p99, max µs), and each thread's counts."""
    summary: list[int] = []
    latency: list[int] = []
    counts: dict[int, ThreadCounts] = {}
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        nums = [int(x) for x in rest.split()] if kind.startswith("wrk-") else []
        if kind == "wrk-summary":
            summary = nums
        elif kind == "wrk-latency-us":
            latency = nums
        elif kind == "wrk-thread":
            counts[nums[0]] = ThreadCounts(*nums[1:])
    if len(summary) != 6 or len(latency) != 3 or not counts:
        raise RuntimeError(f"wrk gave no result: {out[-800:]!r}")
    return summary, latency, counts


def run_wrk_append(
    target: Target,
    stem: str,
    names: dict[int, str],
    mode: str,
    connections: int,
    duration: float,
    threads: int,
    verify_data: bool,
    pids: list[int],
) -> dict[str, Any]:
    """One append run under wrk against streams `stem`0 .. `stem`N-1 (created already)."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not on PATH")
    threads = thread_count(connections, threads)
    seconds = max(1, round(duration))  # wrk takes whole seconds
    if seconds != duration:
        print(f"# wrk runs {seconds} s for --duration {duration:g}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp, "append.lua")
        script.write_text(script_text(target, stem, len(names), threads, mode))
        cmd = [binary, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"]
        cmd += ["--timeout", "10s", "-s", str(script)]
        cmd.append(f"{target.scheme}://{target.host}:{target.port}/")
        cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        code, out, client_cpu = _run(cmd, timeout=seconds + 60)
        server_cpu, elapsed = sum(cpu_seconds(p) for p in pids) - cpu0, time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}: {out[-800:]!r}")
    summary, latency, counts = _parse(out)
    window_s = summary[0] / 1e6
    ok = sum(n.ok for n in counts.values())
    refused = sum(n.refused for n in counts.values())
    doubt = sum(n.doubt for n in counts.values())
    socket_errors = dict(zip(("connect", "read", "write", "timeout"), summary[1:5], strict=True))
    errors = refused + doubt + sum(socket_errors.values())
    metrics: dict[str, Any] = {
        "requests_per_s": ok / window_s,
        "p50_ms": latency[0] / 1000.0,
        "p99_ms": latency[1] / 1000.0,
        "max_ms": latency[2] / 1000.0,
        "errors": errors,
        "client_cpu_pct": 100.0 * client_cpu / window_s,
        "append_driver": "wrk",
        "wrk_threads": threads,
        "duration_s": window_s,
    }
    if pids and ok:
        metrics["server_cpu_ms_per_request"] = 1000.0 * server_cpu / ok
        metrics["server_cpu_us_per_append"] = cpu_us_per_op(server_cpu, ok)
        metrics["server_cpu_pct"] = 100.0 * server_cpu / elapsed
    if mode == "json10":
        metrics["messages_per_s"] = ok * 10 / window_s
    if refused or doubt:
        metrics["statuses"] = {"4xx": refused, "other non-2xx": doubt}
    if any(socket_errors.values()):
        metrics["socket_errors"] = socket_errors
    if errors:
        metrics["failed"] = f"{errors} errors under wrk; the read-back was checked by counts only"
    if verify_data and mode != "sink":
        window = connections // threads
        v = verify(target, mode, names, counts, window, clean=errors == 0)
        metrics["verified_records"] = v["records_checked"]
        metrics["verify_problems"] = v["problem_count"]
        if v["problems"]:
            metrics["verify_examples"] = v["problems"]
    return metrics
