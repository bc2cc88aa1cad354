"""`ds-cluster chaos`: the verifier's judgement on hand-made histories (fast), and short
real runs against a real cluster: one with shard kills and stops, one that SIGKILLs the
supervisor itself (slow, at most about a minute each).
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ds_cluster.tools.chaos.faults import SUPERVISOR, FaultInjector
from ds_cluster.tools.chaos.model import ReaderLog, StreamPlan, WriterLedger
from ds_cluster.tools.chaos.payload import (
    BINARY,
    JSON,
    Decoder,
    PayloadError,
    encode_batch,
    message_id,
)
from ds_cluster.tools.chaos.scaling import ScaleDriver, parse_counts, parse_range
from ds_cluster.tools.chaos.sse import SseParser
from ds_cluster.tools.chaos.verify import verify

ROOT = Path(__file__).resolve().parent.parent


# ---- payloads and SSE parsing ----------------------------------------------------------


@pytest.mark.parametrize("content_type", [JSON, BINARY])
def test_batches_round_trip_even_when_split_across_reads(content_type: str) -> None:
    ids = [message_id("w1", n, i) for n in range(3) for i in range(2)]
    body = b"".join(encode_batch(content_type, ids[k : k + 2]) for k in range(0, 6, 2))
    decoder = Decoder(content_type)
    if content_type == JSON:
        got = [
            mid for k in range(0, 6, 2) for mid in decoder.feed(encode_batch(JSON, ids[k : k + 2]))
        ]
    else:
        got = decoder.feed(body[:7]) + decoder.feed(body[7:40]) + decoder.feed(body[40:])
        assert decoder.leftover == 0
    assert got == ids


def test_corrupted_binary_frame_is_detected() -> None:
    body = bytearray(encode_batch(BINARY, ["w1-000001-0"]))
    body[-1] ^= 0xFF
    with pytest.raises(PayloadError):
        Decoder(BINARY).feed(bytes(body))


def test_sse_parser_handles_split_lines_and_multiline_data() -> None:
    payload = base64.b64encode(b"\x00\xff" * 40).decode()
    text = (
        f"event: data\ndata: {payload[:30]}\ndata: {payload[30:]}\n\n"
        'event: control\r\ndata: {"streamNextOffset":"1_2"}\r\n\r\n: comment\n\n'
    )
    parser = SseParser()
    events = []
    for i in range(0, len(text), 7):
        events += parser.feed(text[i : i + 7])
    assert [e for e, _ in events] == ["data", "control"]
    assert base64.b64decode("".join(events[0][1].split())) == b"\x00\xff" * 40
    assert json.loads(events[1][1]) == {"streamNextOffset": "1_2"}


# ---- the verifier ----------------------------------------------------------------------


def ledger(name: str, batches: list[list[int]], pending: list[int] | None = None) -> WriterLedger:
    ids = lambda ns: [message_id(name, n, 0) for n in ns]  # noqa: E731
    led = WriterLedger(name=name, stream="s")
    led.acked = [ids(b) for b in batches]
    led.pending = ids(pending) if pending is not None else None
    return led


def judge(final: list[str], ledgers: list[WriterLedger], readers=(), prefix=()) -> dict:
    plan = StreamPlan(path="s", content_type=JSON, shard="x", created=True, prefix=list(prefix))
    verdict = verify([plan], {"s": final}, ledgers, list(readers))
    return {
        "lost": verdict.lost,
        "duplicated": verdict.duplicated,
        "reordered": verdict.reordered,
        "phantom": verdict.phantom,
        "partial": verdict.partial,
        "kinds": sorted({v.kind for v in verdict.violations}),
    }


def test_clean_history_interleaving_two_producers_passes() -> None:
    a, b = ledger("a", [[0], [1]]), ledger("b", [[0], [1]])
    final = [a.acked[0][0], b.acked[0][0], b.acked[1][0], a.acked[1][0]]
    assert judge(final, [a, b])["kinds"] == []


def test_lost_duplicated_reordered_phantom_are_each_caught() -> None:
    a = ledger("a", [[0], [1], [2]])
    x0, x1, x2 = (batch[0] for batch in a.acked)
    assert judge([x0, x2], [a])["lost"] == 1
    assert judge([x0, x1, x1, x2], [a])["duplicated"] == 1
    assert judge([x0, x2, x1], [a])["reordered"] == 1
    assert judge([x0, x1, x2, message_id("a", 9, 0)], [a])["phantom"] == 1
    assert judge([x0, x1, x2, message_id("z", 0, 0)], [a])["phantom"] == 1


def test_in_flight_batch_may_be_present_or_absent_but_whole() -> None:
    a = ledger("a", [[0]])
    a.pending = [message_id("a", 1, 0), message_id("a", 1, 1)]
    done = a.acked[0]
    assert judge(done, [a])["kinds"] == []
    assert judge(done + a.pending, [a])["kinds"] == []
    assert judge(done + a.pending[:1], [a])["partial"] == 1


def test_fork_prefix_and_readers() -> None:
    src = [message_id("s", n, 0) for n in range(3)]
    a = ledger("a", [[0], [1]])
    final = src + [batch[0] for batch in a.acked]
    assert judge(final, [a], prefix=src)["kinds"] == []
    assert "fork-prefix" in judge(final[1:], [a], prefix=src)["kinds"]
    good = ReaderLog("r", "s", "sse", received=final[:3])
    gap = ReaderLog("r", "s", "sse", received=final[:1] + final[2:4])
    dup = ReaderLog("r", "s", "long-poll", received=final[:2] + final[1:2])
    behind = ReaderLog("r", "s", "sse", received=final[:2])
    plan = StreamPlan(path="s", content_type=JSON, shard="x", created=True, prefix=src)
    kinds = lambda r, complete=False: sorted(  # noqa: E731
        v.kind for v in verify([plan], {"s": final}, [a], [r], readers_complete=complete).violations
    )
    assert kinds(good) == []
    assert kinds(gap) == ["reader-gap"]
    assert kinds(dup) == ["reader-duplicate"]
    assert kinds(behind, complete=True) == ["reader-behind"]


# ---- a short real run ------------------------------------------------------------------


@pytest.mark.slow
def test_short_chaos_run_passes(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    argv = [sys.executable, "-m", "ds_cluster", "chaos", "--duration", "25", "--shards", "3"]
    argv += ["--kill-interval", "3", "--stop-probability", "0.3", "--seed", "20261128"]
    argv += ["--drain-timeout", "20", "--data-dir", str(tmp_path / "data")]
    argv += ["--report-json", str(report)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(done.stdout[-6000:])
    print(done.stderr[-3000:])
    result = json.loads(report.read_text())
    assert done.returncode == 0, result["violations"]
    assert result["passed"] and result["healthy"]
    assert result["kills"] + result["stops"] >= 4
    assert result["acked_writes"] > 100 and result["forks"] >= 1
    assert result["lost"] == result["duplicated"] == result["reordered"] == 0
    assert result["reader_messages"] > 0
    assert "RESULT: PASS" in done.stdout


def recording_injector(shards: list[str], start: float) -> FaultInjector:
    """An injector that injects no fault of its own: the test records the faults."""
    return FaultInjector(
        dict, shards, random.Random(1), start=start, kill_interval=0, stop_probability=0
    )


async def test_a_supervisor_kill_recovers_only_once_every_shard_wrote_again() -> None:
    start = trio.current_time()
    injector = recording_injector(["shard-0", "shard-1"], start)
    event = injector._record(SUPERVISOR, "supervisor-kill", 1, shards=injector.shards)
    assert injector.down() == ["shard-0", "shard-1"]
    injector.note_write_ok("shard-0", start - 1)  # started before the kill: proves nothing
    injector.note_write_ok("shard-0", trio.current_time())
    assert event.recovered_after is None and injector.down() == ["shard-1"]
    injector.note_write_ok("shard-1", trio.current_time())
    assert event.recovered_after is not None and injector.down() == []


async def test_a_kill_of_a_shard_that_then_left_the_ring_is_closed_as_such() -> None:
    start = trio.current_time()
    injector = recording_injector(["shard-0", "shard-3"], start)
    event = injector._record("shard-3", "kill", 7)
    assert injector.down() == ["shard-3"]
    injector.left_ring({"shard-3"})
    assert injector.down() == [] and event.left_ring and event.recovered_after is None


def test_scale_plans_stay_in_range_or_follow_the_sequence() -> None:
    assert parse_range("3:4") == (3, 4) and parse_counts("4, 3") == [4, 3]
    for bad in ("4:3", "0:2", "3", "a:b"):
        with pytest.raises(ValueError):
            parse_range(bad)
    for bad in ("", "0", "4,x"):
        with pytest.raises(ValueError):
            parse_counts(bad)

    def driver(sequence: list[int] | None = None) -> ScaleDriver:
        return ScaleDriver(
            Path("unused"),
            (3, 5),
            1.0,
            random.Random(3),
            start=0.0,
            shards=3,
            log=print,
            on_begin=print,
            on_done=print,
            sequence=sequence,
        )

    ranged = driver()
    for _ in range(20):
        ranged.shards = ranged._next_count() or 0
        assert 3 <= ranged.shards <= 5
    planned = driver([4, 3])
    assert [planned._next_count(), planned._next_count(), planned._next_count()] == [4, 3, None]


@pytest.mark.slow
def test_chaos_run_that_sigkills_the_supervisor_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL `ds-cluster up` mid-run and start a new one on the same data dir: no
    acknowledged write lost or duplicated, and no child outlives its supervisor."""
    report = tmp_path / "report.json"
    argv = [sys.executable, "-m", "ds_cluster", "chaos", "--duration", "22", "--shards", "2"]
    argv += ["--kill-interval", "0", "--kill-supervisor-interval", "5", "--seed", "20261202"]
    argv += ["--drain-timeout", "20", "--data-dir", str(tmp_path / "data")]
    argv += ["--report-json", str(report)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    print(done.stdout[-6000:])
    print(done.stderr[-3000:])
    result = json.loads(report.read_text())
    assert done.returncode == 0, result["violations"]
    assert result["passed"] and result["healthy"]
    assert result["supervisor_kills"] >= 2
    assert result["orphans"] == 0
    assert result["longest_unavailability_supervisor_kill"] is not None
    assert result["acked_writes"] > 100
    assert result["lost"] == result["duplicated"] == result["reordered"] == 0
    assert result["reader_messages"] > 0
    assert "RESULT: PASS" in done.stdout
