"""`ds-cluster bench`: a short real run against a real cluster, plus the checker's teeth.

The smoke run uses tiny counts and sub-second windows: it proves every scenario produces
numbers and that the append read-back really compares data, not that anything is fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_cluster.tools.bench.append import body_bytes, verify
from ds_cluster.tools.bench.http import ResponseParser, SyncClient
from ds_cluster.tools.bench.targets import REPO, BenchTarget


@pytest.fixture(scope="module")
def cluster():
    bt = BenchTarget("up:1")
    bt.start()
    try:
        yield bt
    finally:
        bt.stop()


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


def test_verify_catches_lost_and_unacknowledged_records(cluster):
    t = cluster.target
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


def test_bench_smoke_run_produces_numbers_and_verifies(cluster, tmp_path: Path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "ds_cluster.cli",
        "bench",
        "--url",
        cluster.target.base,
        "--scenario",
        "append,json-batch,catchup,longpoll,sse,idle",
        "--rounds",
        "1",
        "--duration",
        "1",
        "--processes",
        "1",
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
    assert runs["append"]["requests_per_s"] > 0
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
