"""The append load under wrk: its read-back check (verify_seq.py) fed synthetic read-backs,
and wrk against a real cluster (skipped where wrk is not installed).

The synthetic read-backs are what a correct server may produce at the edge of what the
check allows (the last W posts of a thread missing, posts less than W apart swapped), and
each kind of fault next to it: the check must pass the first and flag every other one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ds_cluster.tools.bench.append import run_append, setup_streams
from ds_cluster.tools.bench.bodies import body_bytes, json_body, records
from ds_cluster.tools.bench.http import Target
from ds_cluster.tools.bench.targets import REPO
from ds_cluster.tools.bench.verify_seq import ThreadCounts, check, owned_streams, stream_of
from ds_cluster.tools.bench.wrk import (
    _lua_string,
    choose_driver,
    run_wrk_append,
    script_text,
    thread_count,
)

STREAMS, THREADS, W = 4, 2, 3  # W: connections per thread

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def readback(
    mode: str, posts: dict[int, list[int]], order: dict[int, list[int]] | None = None
) -> dict[int, list[Any]]:
    """What the streams hold when thread c's posts `posts[c]` were committed, each in its
    stream, thread by thread in post order; `order[s]` replaces stream s by thread 0's
    posts in that order."""
    by_stream: dict[int, list[tuple[int, int]]] = {s: [] for s in range(STREAMS)}
    for c, qs in posts.items():
        for q in qs:
            by_stream[stream_of(c, THREADS, STREAMS, q)].append((c, q))
    for s, qs in (order or {}).items():
        by_stream[s] = [(0, q) for q in qs]
    out: dict[int, list[Any]] = {}
    for s, items in by_stream.items():
        if mode == "bytes":
            chunk = b"".join(body_bytes(s, c, q) for c, q in items)
        else:  # one JSON array of every message, as a catch-up read answers
            bodies = [json_body(mode, s, c, q) for c, q in items]
            chunk = b"[" + b",".join(b[1:-1] if mode == "json10" else b for b in bodies) + b"]"
        out[s] = records(mode, [chunk])
    return out


SENT = {0: ThreadCounts(sent=20, ok=18), 1: ThreadCounts(sent=21, ok=19)}


def problems(
    found: dict[int, list[Any]], counts: dict[int, ThreadCounts] = SENT, clean: bool = True
) -> list[str]:
    return check("bytes", found, counts, STREAMS, W, clean)


def all_but(c: int, drop: set[int]) -> dict[int, list[int]]:
    return {t: [q for q in range(n.sent) if not (t == c and q in drop)] for t, n in SENT.items()}


def test_streams_are_split_over_threads_round_robin():
    assert owned_streams(1, 2, 5) == [1, 3] and owned_streams(3, 4, 2) == [1]
    assert [stream_of(0, 2, 5, q) for q in range(4)] == [0, 2, 4, 0]
    assert thread_count(64, 2) == 2 and thread_count(7, 2) == 1 and thread_count(4, 64) == 4


EVEN = list(range(0, 20, 2))  # thread 0's posts in stream 0


def test_a_correct_read_back_passes_at_the_edge_of_what_is_allowed():
    assert problems(readback("bytes", all_but(0, set()))) == []
    # 2 of thread 0's 20 posts unanswered at the end: any 2 may be missing (a slow
    # connection can hold an early one), as long as 18 (`ok`) are there
    assert problems(readback("bytes", all_but(0, {18, 19}))) == []
    assert problems(readback("bytes", all_but(0, {3, 11}))) == []
    # a slow connection's post 0 may commit after everything else in its stream, and with
    # W = 3 connections two posts may be overtaken at once
    late = {0: [*EVEN[1:], 0]}
    assert problems(readback("bytes", all_but(0, set()), late)) == []
    two_late = {0: [*EVEN[2:], 0, 2]}
    assert problems(readback("bytes", all_but(0, set()), two_late)) == []


def test_a_lost_acknowledged_post_is_flagged():
    answered = {0: ThreadCounts(sent=20, ok=20), 1: SENT[1]}
    lost = problems(readback("bytes", all_but(0, {5})), answered)
    assert len(lost) == 1 and "19 posts read back, 20 acknowledged" in lost[0], lost
    short = problems(readback("bytes", all_but(0, {17, 18, 19})))
    assert len(short) == 1 and "17 posts read back, 18 acknowledged" in short[0], short
    # with errors (counts only) the count still catches it
    weak = problems(readback("bytes", all_but(0, {5, 6, 7})), clean=False)
    assert len(weak) == 1 and "acknowledged" in weak[0], weak


def test_a_duplicate_is_flagged():
    order = {0: [*EVEN, 8]}
    dup = problems(readback("bytes", all_but(0, set()), order), clean=False)
    assert len(dup) == 1 and "duplicated" in dup[0], dup


def test_malformed_corrupt_and_foreign_records_are_flagged():
    good = readback("bytes", all_but(0, {2}))  # 19 of 20 present, 18 acknowledged: allowed
    assert problems(good, clean=False) == []
    corrupt = body_bytes(0, 0, 0)[:50] + b"X" + body_bytes(0, 0, 0)[51:]
    cases = {
        "torn": (0, ("torn", 150)),
        "garbage": (0, ("garbage", b"?" * 100)),
        "corrupt": (0, (0, 0, 0, corrupt)),  # the name of a sent post, not its bytes
        "never sent": (0, (0, 0, 20, body_bytes(0, 0, 20))),  # thread 0 sent 0 .. 19
        "wrong stream": (1, (1, 0, 2, body_bytes(1, 0, 2))),  # its post 2 went to stream 0
        "unknown thread": (0, (0, 5, 0, body_bytes(0, 5, 0))),
        "another stream's record": (0, good[2][0]),
    }
    for name, (s, rec) in cases.items():
        found = {k: list(v) for k, v in good.items()}
        found[s].append(rec)
        assert len(problems(found, clean=False)) == 1, name


def test_an_order_violation_is_flagged_only_beyond_the_window():
    # post 18 read first: the 9 posts before it in its stream were unanswered when it was
    # sent, with 3 connections
    first = {0: [18, *EVEN[:-1]]}
    late = problems(readback("bytes", all_but(0, set()), first))
    assert len(late) == 1 and "post 18 reads back before 9 earlier posts" in late[0], late
    # two posts overtaken (allowed above) and one more never committed: 3 unanswered
    two_late = {0: [*EVEN[2:], 0, 2]}
    beyond = problems(readback("bytes", all_but(0, {1}), two_late))
    assert beyond and all("3 earlier posts unanswered" in p for p in beyond), beyond
    # with errors a reconnect can put more than W in flight: no order check then
    assert problems(readback("bytes", all_but(0, set()), first), clean=False) == []


def test_refused_posts_must_be_absent_and_batches_whole():
    counts = {0: ThreadCounts(sent=20, ok=17, refused=3), 1: SENT[1]}
    found = readback("bytes", all_but(0, set()))
    assert "3 of 20 refused" in problems(found, counts, clean=False)[0]
    assert problems(readback("bytes", all_but(0, {1, 2, 3})), counts, clean=False) == []
    batches = readback("json10", all_but(0, set()))
    assert check("json10", batches, SENT, STREAMS, W, True) == []
    torn = {s: list(r) for s, r in batches.items()}
    torn[0].pop(3)  # message 3 of thread 0's post 0
    found_torn = check("json10", torn, SENT, STREAMS, W, False)
    assert any("not contiguous" in p for p in found_torn)
    assert any("in part" in p for p in found_torn)


def test_parameters_reach_lua_as_plain_bytes():
    text = 'host: h\r\nauthorization: Bearer a"b\\c]]é\r\n'
    lit = _lua_string(text)
    assert '"' not in lit[1:-1] and "\\" + "034" in lit and "\r" not in lit
    target = Target.parse("http://127.0.0.1:1")
    assert script_text(target, "bench-x-", 4, 2, "json").startswith('HEAD_LINES = "host')


def test_without_wrk_the_python_driver_runs_with_a_note(monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without wrk
    assert choose_driver(None) == "python"
    assert "wrk is not on PATH" in capsys.readouterr().err
    assert choose_driver("python") == "python"
    with pytest.raises(SystemExit, match="not on PATH"):
        choose_driver("wrk")


@needs_wrk
@pytest.mark.parametrize(("mode", "threads"), [("bytes", 2), ("json10", 8)])
def test_wrk_against_a_cluster_verifies_every_stream(bench_cluster, mode: str, threads: int):
    """2 threads (the default) and one connection per thread (the exact check)."""
    pids = bench_cluster.pids()
    m = run_append(
        bench_cluster.target,
        "wrk",
        f"{mode}{threads}",
        mode,
        connections=8,
        streams=16,
        duration=1.0,
        processes=1,
        pids=pids,
        driver="wrk",
        wrk_threads=threads,
    )
    assert m["append_driver"] == "wrk" and m["wrk_threads"] == threads, m
    assert m["errors"] == 0 and m["verify_problems"] == 0, m
    assert m["requests_per_s"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"], m
    per_post = 10 if mode == "json10" else 1
    assert m["verified_records"] >= m["requests_per_s"] * m["duration_s"] * per_post, m
    assert m["client_cpu_pct"] > 0 and m["server_cpu_us_per_append"] > 0, m


@needs_wrk
def test_bench_without_a_driver_named_uses_wrk(bench_cluster, tmp_path: Path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "ds_cluster.cli", "bench", "--url", bench_cluster.target.base]
    cmd += ["--scenario", "append", "--rounds", "1", "--duration", "1", "--connections", "4"]
    cmd += ["--streams", "8", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (runs,) = json.loads(out.read_text())["runs"]["append"].values()
    run = runs[0]
    assert run["append_driver"] == "wrk" and run["verify_problems"] == 0, run


@needs_wrk
def test_refused_appends_are_errors_that_fail_the_run(bench_cluster):
    """Octet-stream bodies to JSON streams: every answer a 4xx, counted and failing."""
    stem = "bench-wrk-refused-"
    names = setup_streams(bench_cluster.target, stem, 4, "json")
    m = run_wrk_append(bench_cluster.target, stem, names, "bytes", 4, 1.0, 2, False, [])
    assert m["errors"] > 0 and m["statuses"]["4xx"] == m["errors"], m
    assert m["requests_per_s"] == 0 and "failed" in m, m
