"""`ds-cluster bench`: a short real run against a real cluster, plus the checker's teeth.

The smoke run uses tiny counts and sub-second windows: it proves every scenario produces
numbers and that the append read-back really compares data, not that anything is fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_cluster.tools.bench import add_arguments
from ds_cluster.tools.bench.append import body_bytes, verify
from ds_cluster.tools.bench.http import ResponseParser, SyncClient
from ds_cluster.tools.bench.instructions import _appends
from ds_cluster.tools.bench.presets import fanout_shape, selected
from ds_cluster.tools.bench.report import HIGHER, LOWER, markdown, ours_vs_best, summary
from ds_cluster.tools.bench.stats import cpu_us_per_op
from ds_cluster.tools.bench.storage import measure_commit_latency, percentiles
from ds_cluster.tools.bench.targets import REPO, BenchTarget, up_options


def test_parser_handles_chunked_and_bodiless_responses():
    p = ResponseParser()
    wire = (
        b"HTTP/1.1 204 No Content\r\nStream-Next-Offset: 5\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nxy"
    )
    done = []
    for i in range(len(wire)):  # byte by byte: every split point must work
        done += p.feed(wire[i : i + 1])
    assert [(r.status, r.body) for r in done] == [(204, b""), (200, b"abcde"), (200, b"xy")]
    assert done[0].headers["stream-next-offset"] == "5"


def test_verify_catches_lost_and_unacknowledged_records(bench_cluster):
    t = bench_cluster.target
    ct = {"content-type": "application/octet-stream"}
    with SyncClient(t) as c:
        for name in ("bench-verify-0", "bench-verify-1"):
            assert c.request("PUT", t.path(name), headers=ct).status in (200, 201)
        for q in range(3):
            assert (
                c.request("POST", t.path("bench-verify-0"), body_bytes(0, 0, q), ct).status == 204
            )
    names = {0: "bench-verify-0"}
    ok = verify(t, "bytes", names, {(0, 0): [0, 1, 2]}, {}, {})
    assert ok["problem_count"] == 0 and ok["records_checked"] == 3
    # q=2 was never acknowledged: it must be flagged (unless it is in doubt)
    assert verify(t, "bytes", names, {(0, 0): [0, 1]}, {}, {})["problem_count"] == 1
    assert verify(t, "bytes", names, {(0, 0): [0, 1]}, {}, {(0, 0): [2]})["problem_count"] == 0
    # an acknowledged record that is not there is lost
    lost = verify(t, "bytes", names, {(0, 0): [0, 1, 2, 3]}, {}, {})
    assert lost["problem_count"] == 1 and "lost" in lost["problems"][0]


def test_bench_smoke_run_produces_numbers_and_verifies(bench_cluster, tmp_path: Path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "ds_cluster.cli",
        "bench",
        "--url",
        bench_cluster.target.base,
        "--scenario",
        "append,json-batch,catchup,longpoll,sse,idle",
        "--rounds",
        "1",
        "--duration",
        "1",
        "--processes",
        "1",
        "--append-driver",
        "python",  # wrk's driver has tests of its own (test_bench_wrk.py)
        "--connections",
        "8",
        "--streams",
        "16",
        "--catchup-streams",
        "2",
        "--catchup-size",
        "262144",
        "--catchup-readers",
        "2",
        "--fanout-readers",
        "20",
        "--fanout-streams",
        "2",
        "--fanout-rate",
        "20",
        "--idle-connections",
        "50",
        "--idle-hold",
        "0.2",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    runs = {s: m[0] for s, by in doc["runs"].items() for m in by.values()}
    assert runs["append"]["requests_per_s"] > 0 and runs["append"]["append_driver"] == "python"
    assert runs["append"]["errors"] == 0 and runs["append"]["verify_problems"] == 0
    assert runs["append"]["verified_records"] >= runs["append"]["requests_per_s"] * 0.5
    assert runs["json-batch"]["verify_problems"] == 0 and runs["json-batch"]["messages_per_s"] > 0
    assert runs["catchup"]["mb_per_s"] > 0 and runs["catchup"]["errors"] == 0
    for mode in ("longpoll", "sse"):
        r = runs[mode]
        assert r["expected"] == r["delivered"] > 0, r
        assert r["lost"] == 0 and r["duplicates"] == 0 and r["p99_ms"] > 0
    assert (
        runs["idle"]["held"] == 50 and runs["idle"]["kib_per_conn"] == runs["idle"]["kib_per_conn"]
    )
    assert "requests_per_s" in proc.stdout  # the table
    assert doc["machine"]["cpus"] == os.cpu_count() and doc["machine"]["cpu_model"]


def test_a_terminated_bench_stops_the_servers_it_started():
    """The managed servers run in sessions of their own, out of reach of a signal to the
    bench's group: the bench itself must stop them when it is terminated."""
    cmd = [
        sys.executable, "-m", "ds_cluster.cli", "bench", "--url", "up:1x1",
        "--scenario", "append", "--rounds", "20", "--duration", "5", "--no-verify",
        "--append-driver", "python", "--processes", "1", "--connections", "2", "--streams", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        pids: list[int] = []
        for line in proc.stderr:
            if line.startswith("# target up:1x1:"):
                pids = [int(p) for p in re.findall(r"\d+", line.split("pids=", 1)[1])]
            if line.startswith("# append round 1"):
                break
        assert pids, "the bench never reported its target's processes"
        proc.terminate()
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:  # what a failed check left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cpu_per_append_is_server_cpu_over_acknowledged_appends():
    assert cpu_us_per_op(0.33, 1000) == pytest.approx(330.0)  # 0.33 ms each
    assert cpu_us_per_op(1.1, 20_000) == pytest.approx(55.0)
    assert math.isnan(cpu_us_per_op(1.0, 0))


def test_ours_vs_best_peer_picks_the_best_in_the_metrics_direction():
    peers = {"ref:file": 2111.0, "ref:memory": 28296.0, "rakaia": 12793.0}
    best, ratio, ahead = ours_vs_best(4480.0, peers, HIGHER)
    assert (best, round(ratio, 2), ahead) == ("ref:memory", 0.16, False)
    # latency: the lowest peer is the best one, and a ratio below 1 is ahead
    p99 = {"ref:file": 1127.0, "ref:memory": 11.6, "rakaia": 13.9}
    best, ratio, ahead = ours_vs_best(8.9, p99, LOWER)
    assert (best, round(ratio, 2), ahead) == ("ref:memory", 0.77, True)
    best, ratio, ahead = ours_vs_best(732.0, p99, LOWER)
    assert (best, ahead) == ("ref:memory", False) and ratio > 60
    # a peer without a figure (its run failed) is not the best one; no peer at all: no ratio
    assert ours_vs_best(5.0, {"a": math.nan, "b": 10.0}, LOWER)[:2] == ("b", 0.5)
    assert ours_vs_best(5.0, {"a": math.nan}, LOWER)[0] == ""
    assert math.isnan(ours_vs_best(math.nan, {"a": 1.0}, HIGHER)[1])


def test_summary_takes_medians_per_target_and_writes_the_issue_table():
    args = bench_args("--catchup-readers", "32", "--catchup-streams", "8")
    labels = ["up", "ref:memory", "rakaia"]
    results = {
        "append": {
            "up": [
                {"requests_per_s": 4000.0, "server_cpu_us_per_append": 300.0, "errors": 0},
                {"requests_per_s": 5000.0, "server_cpu_us_per_append": 340.0, "errors": 0},
                {"requests_per_s": 9000.0, "server_cpu_us_per_append": 320.0, "errors": 0},
            ],
            "ref:memory": [{"requests_per_s": 28000.0, "server_cpu_us_per_append": 40.0}],
            "rakaia": [{"run_error": "RuntimeError: x"}, {"requests_per_s": 12000.0}],
        },
        "sse-1000": {
            "up": [{"p99_ms": 9.0, "writer_rate": 50.0}],
            "ref:memory": [{"p99_ms": 12.0, "writer_rate": 50.0}],
            "rakaia": [{"p99_ms": 14.0, "writer_rate": 49.0}],
        },
    }
    rows = {(r["scenario"], r["metric"]): r for r in summary(results, labels, list(results), args)}
    append = "append, 64 connections / 256 streams / 100 B"
    rps = rows[(append, "req/s")]
    assert rps["values"] == {"up": 5000.0, "ref:memory": 28000.0, "rakaia": 12000.0}
    assert rps["ours_vs_best"] == "0.18x ref:memory"
    cpu = rows[(append, "server CPU per append, µs")]
    assert cpu["values"]["up"] == 320.0 and math.isnan(cpu["values"]["rakaia"])
    assert cpu["ours_vs_best"] == "8.00x ref:memory"
    assert rows[(append, "errors")]["ours_vs_best"] == ""
    sse = "SSE, 1,000 readers / 10 streams / 50 msg/s"
    assert rows[(sse, "p99 ms")]["ours_vs_best"] == "0.75x ref:memory (ahead)"
    assert rows[(sse, "writer msg/s")]["ours_vs_best"] == "1.00x ref:memory"
    table = markdown(list(rows.values()), labels).splitlines()
    assert table[0] == "| scenario | metric | up | ref:memory | rakaia | ours vs best peer |"
    assert table[1] == "|---|---|---:|---:|---:|---|"
    assert f"| {append} | req/s | 5,000 | 28,000 | 12,000 | 0.18x ref:memory |" in table
    assert f"| {append} | errors | 0 | - | - |  |" in table


def test_presets_name_the_issue_scenarios_and_keep_the_old_names():
    args = bench_args()
    assert selected([], ["goals"]) == [
        "append",
        "catchup",
        "longpoll-1000",
        "longpoll-500",
        "sse-500",
        "sse-1000",
        "idle",
    ]
    assert selected(["append,sse", "append"], []) == ["append", "sse"]
    assert selected([], [])[:3] == ["append", "json", "json-batch"]
    with pytest.raises(SystemExit):
        selected(["longpoll-2000"], [])
    lp = fanout_shape("longpoll-500", args)
    assert (lp.mode, lp.readers, lp.streams, lp.rate) == ("long-poll", 500, 50, 100.0)
    sse = fanout_shape("sse-1000", args)
    assert (sse.mode, sse.readers, sse.streams, sse.rate) == ("sse", 1000, 10, 50.0)
    custom = fanout_shape("sse", bench_args("--fanout-readers", "20", "--fanout-rate", "5"))
    assert (custom.mode, custom.readers, custom.rate) == ("sse", 20, 5.0)
    # the issue's catch-up shape is the default
    assert (args.catchup_readers, args.catchup_streams, args.catchup_size) == (32, 8, 1 << 20)


def test_commit_latency_measures_lone_commits_and_bare_syncs(tmp_path: Path):
    assert percentiles([float(v) for v in range(1, 101)]) == "50.000 / 90.000 / 99.000 / 100.000"
    found = measure_commit_latency(tmp_path, 200.0, 0.1)
    assert list(found) == [
        "SQLite commit of one row",
        "  CPU of the commit",
        "bare fdatasync",
        "  CPU of the fdatasync",
    ]
    for text in found.values():
        p50, p90, p99, top = (float(v) for v in text.split(" / "))
        assert 0 < p50 <= p90 <= p99 <= top
    commit_wall, commit_cpu = (float(found[k].split(" / ")[0]) for k in list(found)[:2])
    assert commit_cpu <= commit_wall * 1.5  # (clock granularity aside, CPU is within wall)


def test_up_specs_name_the_cluster_options():
    assert up_options("up") == []
    assert up_options("up:3") == ["--shards", "3", "--gateways", "1"]
    assert up_options("up:2x4") == ["--shards", "2", "--gateways", "4"]
    assert up_options("up:normal") == ["--synchronous", "NORMAL"]
    assert up_options("up:1x2:normal") == [
        "--shards", "1", "--gateways", "2", "--synchronous", "NORMAL"
    ]  # fmt: skip
    for bad in ("up:x", "up:2xq", "up:full", "up:2:fast"):
        with pytest.raises(ValueError):
            up_options(bad)


def test_an_up_normal_target_runs_its_shards_without_a_sync_per_commit():
    """What isolates the fsync's cost must differ from the default in that alone."""
    bt = BenchTarget("up:1x1:normal")
    bt.start()
    try:
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in bt.pids()]
        shards = [c for c in cmdlines if b"shard" in c and b"--id" in c]
        assert len(shards) == 1
        assert shards[0][shards[0].index(b"--synchronous") + 1] == b"NORMAL"
        with SyncClient(bt.target) as c:
            ct = {"content-type": "text/plain"}
            assert c.request("PUT", bt.target.path("n"), headers=ct).status == 201
            assert c.request("POST", bt.target.path("n"), b"x", ct).status == 204
    finally:
        bt.stop()


@pytest.mark.slow
def test_rakaia_target_installs_and_answers_an_append_and_a_read():
    """Needs PyPI on first use (the venv is then reused from the user's cache)."""
    bt = BenchTarget("rakaia")
    bt.start()
    try:
        t = bt.target
        assert bt.pids(), "its uvicorn process counts for server CPU"
        ct = {"content-type": "application/octet-stream"}
        with SyncClient(t) as c:
            assert c.request("PUT", t.path("bench-rakaia"), headers=ct).status in (200, 201)
            for q in range(3):
                assert (
                    c.request("POST", t.path("bench-rakaia"), body_bytes(0, 0, q), ct).status == 204
                )
        ok = verify(t, "bytes", {0: "bench-rakaia"}, {(0, 0): [0, 1, 2]}, {}, {})
        assert ok["problem_count"] == 0 and ok["records_checked"] == 3
        # --fresh: a new process, and (in memory) nothing of the old one's streams
        before = bt.pids()
        bt.restart()
        assert bt.pids() and not set(bt.pids()) & set(before)
        with SyncClient(bt.target) as c:
            assert c.request("GET", bt.target.path("bench-rakaia") + "?offset=-1").status == 404
    finally:
        bt.stop()
    assert bt.proc is None


@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="needs valgrind",
)
@pytest.mark.parametrize("process", ["shard", "gateway"])
def test_instruction_count_of_one_process_per_append(process: str) -> None:
    """`tools/bench/instructions.py` counts only the measured window of the chosen process:
    a plausible count per append (not start-up, not zero), and the group commits seen."""
    done = subprocess.run(
        [sys.executable, "-m", "ds_cluster.tools.bench.instructions", "--process", process]
        + ["--appends", "300", "--connections", "8", "--streams", "16"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    count = int(line.split(": ", 1)[1].split(" ", 1)[0].replace(",", ""))
    group = float(line.split("instructions per append, ", 1)[1].split(" ", 1)[0])
    assert 20_000 < count < 2_000_000, line
    assert 1.0 <= group <= 8.0, line


def test_instruction_load_spreads_over_every_stream() -> None:
    """The counted appends go round robin over all the streams, not over one stream per
    `connections`-th (each connection starts on a stream of its own)."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            seen.append(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        paths = [f"/v1/stream/s-{i}" for i in range(16)]
        async with server:
            await _appends(port, paths, 64, 4)
        assert len(seen) == 64
        assert {p.decode() for p in seen} == set(paths)

    asyncio.run(main())
