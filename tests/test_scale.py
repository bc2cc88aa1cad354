"""Scaling a cluster: the data dir's record, `up` on an existing dir, the control socket,
`ds-cluster scale` / `status` / `rebalance`, and live moves under load with kills.

Everything runs real processes (the supervisor in-process or as `ds-cluster up`, shards
and gateways as its children) on real SQLite files in the test's directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.cluster import print_log_tails, running_cluster

from ds_cluster.common.ring import Ring
from ds_cluster.supervisor import control, record
from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor, SupervisorError, _free_ports
from ds_cluster.supervisor.record import ClusterRecord, RecordError, ScaleJournal
from ds_cluster.tools.chaos import ChaosOptions, run_chaos

REPO = Path(__file__).resolve().parent.parent
TEXT = {"content-type": "text/plain"}


def ds_cluster(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`ds-cluster ARGV...` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ds_cluster", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def ds_cluster_async(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The same, without blocking the test's event loop (the cluster runs in it)."""
    return await trio.to_thread.run_sync(lambda: ds_cluster(*argv, timeout=timeout))


async def put_streams(client: httpx.AsyncClient, names: list[str]) -> None:
    for name in names:
        response = await client.put(f"/v1/stream/{name}", headers=TEXT, content=name.encode())
        assert response.status_code == 201, response.text


async def assert_streams(client: httpx.AsyncClient, names: list[str]) -> None:
    for name in names:
        response = await client.get(f"/v1/stream/{name}", params={"offset": "-1"})
        assert response.status_code == 200, (name, response.status_code, response.text)
        assert response.content == name.encode()


# ---- the record (pure) ----------------------------------------------------------------


def test_record_reads_the_first_format_and_round_trips() -> None:
    old = ClusterRecord.from_json({"shards": 3})
    assert old == ClusterRecord(("shard-0", "shard-1", "shard-2"), 1)
    scaling = old.begin_scale(record.shard_ids(4), {"shard-3": 23456})
    assert scaling.scale == ScaleJournal(record.shard_ids(4), 2)
    assert scaling.running_shards == record.shard_ids(4)
    assert ClusterRecord.from_json(json.loads(json.dumps(scaling.to_json()))) == scaling
    done = scaling.finish_scale()
    assert (done.shards, done.ring_version, done.scale) == (record.shard_ids(4), 2, None)


def test_record_shrinking_keeps_the_leaving_shards_until_done() -> None:
    four = ClusterRecord(record.shard_ids(4), 2, {f"shard-{k}": 20000 + k for k in range(4)})
    shrinking = four.begin_scale(record.shard_ids(3), {})
    assert shrinking.running_shards == record.shard_ids(4)  # shard-3 hands over first
    done = shrinking.finish_scale()
    assert done.shards == record.shard_ids(3) and "shard-3" not in done.ports
    assert done.ring_version == 3


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"shards": 0},
        {"shards": ["shard-0", "shard-0"]},
        {"shards": ["shard-0"], "ring_version": 0},
        {"shards": ["shard-0"], "ports": {"shard-0": 70000}},
        {"shards": ["shard-0"], "ring_version": 2, "scale": {"shards": ["a"], "ring_version": 2}},
    ],
)
def test_record_refuses_what_describes_no_cluster(data: Any) -> None:
    with pytest.raises(RecordError):
        ClusterRecord.from_json(data)


# ---- `up` on an existing data dir ------------------------------------------------------


@pytest.mark.slow
async def test_up_reuses_the_recorded_count_and_addresses(tmp_path: Path) -> None:
    names = [f"kept-{i}" for i in range(12)]
    async with running_cluster(tmp_path, shards=3) as first:
        ports = {sid: port for sid, (_, port) in first.shard_addresses.items()}
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            await put_streams(client, names)
    recorded = record.load(tmp_path / "data")
    assert recorded is not None
    assert recorded.shards == record.shard_ids(3) and recorded.ports == ports

    async with running_cluster(tmp_path, shards=None) as second:  # no --shards
        assert second.shard_ids == list(record.shard_ids(3))
        assert {sid: port for sid, (_, port) in second.shard_addresses.items()} == ports
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
            await assert_streams(client, names)


@pytest.mark.slow
async def test_up_on_a_dir_of_the_first_format_upgrades_its_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "cluster.json").write_text('{"shards": 3}\n')
    async with running_cluster(tmp_path, shards=None) as cluster:
        assert cluster.shard_ids == ["shard-0", "shard-1", "shard-2"]
    recorded = record.load(data)
    assert recorded is not None and set(recorded.ports) == {"shard-0", "shard-1", "shard-2"}


async def test_an_unreadable_record_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "cluster.json").write_text('{"shards": "three"}\n')
    with pytest.raises(SupervisorError, match="cluster.json is unreadable"):
        await Supervisor(ClusterConfig(port=0, data_dir=data)).run()
    assert (data / "cluster.json").read_text() == '{"shards": "three"}\n'


async def test_a_start_on_a_busy_port_leaves_the_data_dir_as_it_was(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.socket.socket() as busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # A new dir: no record is left behind, so any --shards works next time.
        config = ClusterConfig(shards=2, port=port, data_dir=data, owner_wait=0.5)
        with pytest.raises(SupervisorError, match=f"127.0.0.1:{port}"):
            await Supervisor(config).run()
        assert not (data / "cluster.json").exists()
        assert not any(p.name.startswith("shard-") for p in data.iterdir())
        # A dir that holds a cluster (mid-scale, even): its record is not touched.
        journal = ClusterRecord(
            record.shard_ids(2), 4, {"shard-0": 20001, "shard-1": 20002}
        ).begin_scale(record.shard_ids(3), {"shard-2": 20003})
        record.save(data, journal)
        before = (data / "cluster.json").read_bytes()
        config = ClusterConfig(shards=5, port=port, data_dir=data, owner_wait=0.5)
        with pytest.raises(SupervisorError, match=f"127.0.0.1:{port}"):
            await Supervisor(config).run()
        assert (data / "cluster.json").read_bytes() == before


@pytest.mark.slow
async def test_up_with_another_count_moves_the_recorded_cluster_to_it(tmp_path: Path) -> None:
    """`up --shards 3` on a dir recorded with 2 starts the 2, then scales: every stream is
    still there, the record and the gateway's ring say 3, `status --url` shows them."""
    names = [f"grown-{i}" for i in range(16)]
    async with (
        running_cluster(tmp_path, shards=2) as first,
        httpx.AsyncClient(base_url=first.url, timeout=30) as client,
    ):
        await put_streams(client, names)
    async with running_cluster(tmp_path, shards=3) as cluster:
        with trio.fail_after(120):  # the scale starts once the recorded 2 are ready
            while True:
                recorded = record.load(cluster.data_dir)
                assert recorded is not None
                if recorded.shards == record.shard_ids(3) and recorded.scale is None:
                    break
                await trio.sleep(0.2)
        assert recorded.ring_version == 2
        assert cluster.shard_ids == ["shard-0", "shard-1", "shard-2"]
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            await assert_streams(client, names)
        status = await ds_cluster_async("status", "--url", cluster.url, "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        parsed = json.loads(status.stdout)
        assert parsed["ring"]["version"] == 2
        assert parsed["ring"]["shards"] == ["shard-0", "shard-1", "shard-2"]
        assert sum(s["streams"] for s in parsed["shards"].values()) >= len(names)
        assert all(s["done"] and s["ring_version"] == 2 for s in parsed["shards"].values())
        text = await ds_cluster_async("status", "--url", cluster.url)
        assert "ring v2: shard-0, shard-1, shard-2" in text.stdout
        assert parsed["shards"]["shard-2"]["streams"] > 0  # shard-2 took its share


@pytest.mark.slow
async def test_rebalance_command_drains_a_shard_without_the_supervisor(tmp_path: Path) -> None:
    """`ds-cluster rebalance` (the Kubernetes driver) given two of three shards: the third
    hands everything over and reports done; a rerun finds nothing left to do."""
    names = [f"drained-{i}" for i in range(16)]
    async with running_cluster(tmp_path, shards=3) as cluster:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            await put_streams(client, names)
        endpoints = ",".join(
            f"{sid}=127.0.0.1:{port}"
            for sid, (_, port) in sorted(cluster.shard_addresses.items())
            if sid != "shard-2"
        )
        secret = str(cluster.data_dir / "cluster.secret")
        argv = ("rebalance", "--shard-endpoints", endpoints, "--cluster-secret-file", secret)
        first = await ds_cluster_async(*argv)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "every shard serves on ring v2" in first.stdout
        again = await ds_cluster_async(*argv)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "ring v2" in again.stdout and "moved 0 streams" in again.stdout
        # The gateway has not met ring v2 through its traffic yet: its status takes it.
        seen = await ds_cluster_async("status", "--url", cluster.url, "--json")
        parsed = json.loads(seen.stdout)
        assert parsed["ring"]["version"] == 2, parsed
        assert parsed["ring"]["shards"] == ["shard-0", "shard-1"]
        status = await supervisor_status(cluster.data_dir)
        assert status["shards"]["shard-2"]["streams"] == 0
        assert status["shards"]["shard-2"]["ring_version"] == 2
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            await assert_streams(client, names)
        bad = await ds_cluster_async(
            "rebalance", "--shard-endpoints", "nonsense", "--cluster-secret-file", secret
        )
        assert bad.returncode == 2 and "expected ID=HOST:PORT" in bad.stderr


# ---- the control socket --------------------------------------------------------------


async def _raw_control(path: Path, payload: bytes) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(payload)
        out = bytearray()
        with trio.fail_after(15):
            while data := await stream.receive_some(65536):
                out += data
        return bytes(out)


@pytest.mark.slow
async def test_the_control_socket_is_private_bounded_and_refuses_bad_requests(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, shards=2) as cluster:
        path = control.socket_path(cluster.data_dir)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)

        answer = await _raw_control(path, b"not json\n")
        assert json.loads(answer) == {
            "type": "result",
            "ok": False,
            "message": "request is not JSON",
        }
        answer = await _raw_control(path, b"x" * (control.MAX_REQUEST + 10))
        assert b"over 4096 bytes" in answer and b'"ok":false' in answer
        answer = await _raw_control(path, b'{"op": "reboot"}\n')
        assert b"unknown op" in answer
        for bad in (0, -1, "3", 10_000, None):
            line = json.dumps({"op": "scale", "shards": bad}).encode() + b"\n"
            assert b'"ok":false' in await _raw_control(path, line)

        # At most MAX_CLIENTS at once: one more is refused at once, not queued.
        idle = [
            trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            for _ in range(control.MAX_CLIENTS)
        ]
        for sock in idle:
            await sock.connect(str(path))
        await trio.sleep(0.5)
        assert b"too many control connections" in await _raw_control(path, b"")
        for sock in idle:
            sock.close()

        # A client that sends nothing is dropped after the deadline; the rest goes on.
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        with sock:
            status = await ds_cluster_async("status", "--data-dir", str(cluster.data_dir), "--json")
        assert status.returncode in (0, 1), status.stderr
        parsed = json.loads(status.stdout)
        assert parsed["ring"]["shards"] == ["shard-0", "shard-1"]
        assert set(parsed["shards"]) == {"shard-0", "shard-1"}
        assert parsed["url"] == cluster.url
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            await put_streams(client, ["still-serving"])
    assert not path.exists()  # removed with the supervisor


def test_scale_and_status_without_a_supervisor_say_so(tmp_path: Path) -> None:
    result = ds_cluster("scale", "--data-dir", str(tmp_path), "--shards", "3")
    assert result.returncode == 2
    assert "no supervisor is running" in result.stderr
    record.save(tmp_path, ClusterRecord(record.shard_ids(2), 3, {"shard-0": 20001}))
    result = ds_cluster("status", "--data-dir", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "not running" in result.stdout and "ring v3: shard-0, shard-1" in result.stdout


# ---- live moves under load -----------------------------------------------------------


def moved_fraction(paths: list[str], before: int, after: int) -> float:
    """The share of `paths` whose owner differs between rings of `before` and `after`."""
    old, new = Ring(1, record.shard_ids(before)), Ring(2, record.shard_ids(after))
    return sum(old.owner(p) != new.owner(p) for p in paths) / len(paths)


@pytest.mark.slow
async def test_scale_3_to_4_to_3_under_idempotent_writers_and_live_readers(
    tmp_path: Path,
) -> None:
    """The chaos workload (idempotent producers, long-poll and SSE readers on every stream,
    cross-shard forks) while the cluster goes 3 -> 4 -> 3 shards: nothing lost,
    duplicated or reordered, every reader gap-free, no 4xx seen by any client."""
    options = ChaosOptions(
        duration=45,
        shards=3,
        kill_interval=0,
        scale_interval=8,
        scale_to="4,3",
        streams_per_shard=4,
        data_dir=str(tmp_path / "chaos"),
        drain_timeout=60,
    )
    lines: list[str] = []
    result = await run_chaos(options, out=lines.append)
    print("\n".join(lines))
    figures = result.to_json()
    assert [(e.before, e.after, e.ok) for e in result.scales] == [(3, 4, True), (4, 3, True)]
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0
    assert figures["phantom"] == figures["partial"] == 0
    assert figures["reader_errors"] == 0 and figures["reader_messages"] > 0
    assert result.stats.client_errors() == {}
    assert figures["acked_writes"] > 100
    assert result.passed, [str(v) for v in result.violations]
    paths = [f"chaos-x/s{n}" for n in range(2000)]
    total = result.streams + figures["forks"]
    print(
        f"scale 3 -> 4: moved {result.scales[0].moved_streams} of ~{total} streams "
        f"(ring says {moved_fraction(paths, 3, 4):.0%} of paths move; 1/4 expected); "
        f"4 -> 3: moved {result.scales[1].moved_streams}; scales took "
        f"{result.scales[0].took:.1f} s and {result.scales[1].took:.1f} s; "
        f"write latency p99 {figures['write_p99']:.2f} s, longest {figures['longest_write']:.2f} s "
        f"({figures['longest_write_moved_stream'] or 0:.2f} s on a moved stream, "
        f"{figures['longest_write_unmoved_stream'] or 0:.2f} s on the others)"
    )
    assert result.scales[0].moved_streams >= 1 and result.scales[1].moved_streams >= 1


@pytest.mark.slow
async def test_a_scale_that_cannot_finish_fails_clearly_and_resumes_later(tmp_path: Path) -> None:
    """The new shard is SIGSTOPped as it starts: `scale` exits 1 with the reason once
    nothing moved for the stall timeout, the journal stays and the cluster serves; after
    SIGCONT the same command finishes the scale."""
    names = [f"stuck-{i}" for i in range(16)]
    async with running_cluster(tmp_path, shards=2, scale_stall_timeout=4.0) as cluster:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            await put_streams(client, names)
        argv = ("scale", "--data-dir", str(cluster.data_dir), "--shards", "3")
        results: list[subprocess.CompletedProcess[str]] = []
        async with trio.open_nursery() as nursery:

            async def scale() -> None:
                results.append(await ds_cluster_async(*argv))

            nursery.start_soon(scale)
            with trio.fail_after(60):
                while (pid := cluster.child_pids().get("shard-2")) is None:
                    await trio.sleep(0.01)
            os.kill(pid, signal.SIGSTOP)
        try:
            failed = results[0]
            assert failed.returncode == 1, failed.stdout + failed.stderr
            assert "nothing moved for 4 s" in failed.stderr
            assert "running the same scale again resumes it" in failed.stderr
            recorded = record.load(cluster.data_dir)
            assert recorded is not None and recorded.scale is not None
            assert recorded.shards == record.shard_ids(2)  # still the serving record
            stays = [n for n in names if Ring(2, record.shard_ids(3)).owner(n) != "shard-2"]
            async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
                await assert_streams(client, stays)  # what does not move is served
        finally:
            os.kill(pid, signal.SIGCONT)
        done = await ds_cluster_async(*argv)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "serves on 3 shards" in done.stdout
        recorded = record.load(cluster.data_dir)
        assert recorded is not None and recorded.scale is None
        assert recorded.shards == record.shard_ids(3)
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
            await assert_streams(client, names)


# ---- SIGKILL mid-move --------------------------------------------------------------------

BIG = 6 * 1024 * 1024  # bytes per big stream: a move of several chunks (shard/handoff.py)
PIECE = 512 * 1024
BINARY = {"content-type": "application/octet-stream"}


def big_body(name: str) -> bytes:
    seed = name.encode() * (1 + 4096 // len(name))
    return (seed[:4096] * (BIG // 4096 + 1))[:BIG]


class UpProcess:
    """`ds-cluster up` as its own process, so that it can be SIGKILLed like any other."""

    def __init__(self, data: Path, port: int, log_dir: Path) -> None:
        self.argv = [sys.executable, "-m", "ds_cluster", "up", "--port", str(port)]
        self.argv += ["--data-dir", str(data), "--log-dir", str(log_dir)]
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir = log_dir
        self.process: trio.Process | None = None
        self.output = bytearray()

    async def start(self, nursery: trio.Nursery, *extra: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "up.stderr", "ab") as stderr:
            self.process = await trio.lowlevel.open_process(
                [*self.argv, *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr
            )
        ready = trio.Event()
        nursery.start_soon(self._drain, self.process, ready)
        with trio.fail_after(120):
            await ready.wait()

    async def _drain(self, process: trio.Process, ready: trio.Event) -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            self.output += chunk
            if b"ready at" in self.output:
                ready.set()
        assert ready.is_set(), f"up exited early: {self.output.decode(errors='replace')}"

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


class Appender:
    """An idempotent producer appending numbered lines to one stream until stopped."""

    def __init__(self, client: httpx.AsyncClient, path: str) -> None:
        self.client, self.path = client, path
        self.acked: list[str] = []
        self.errors: list[str] = []

    async def run(self, stop: trio.Event) -> None:
        seq = 0
        while not stop.is_set():
            line = f"{self.path}:{seq:06d}\n"
            headers = {**TEXT, "producer-id": "p", "producer-epoch": "0"}
            headers["producer-seq"] = str(seq)
            while True:
                try:
                    response = await self.client.post(
                        f"/v1/stream/{self.path}", headers=headers, content=line.encode()
                    )
                    if response.status_code in (200, 204):
                        break
                    if 400 <= response.status_code < 500 and response.status_code != 429:
                        self.errors.append(f"{response.status_code} {response.text[:100]}")
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)
            self.acked.append(line)
            seq += 1
            await trio.sleep(0.05)


async def read_all(client: httpx.AsyncClient, path: str) -> bytes:
    out, offset = bytearray(), "-1"
    with trio.fail_after(120):
        while True:
            response = await client.get(f"/v1/stream/{path}", params={"offset": offset})
            if response.status_code != 200:
                await trio.sleep(0.2)  # a restarting cluster: 503 until it is back
                continue
            out += response.content
            offset = response.headers["stream-next-offset"]
            if response.headers.get("stream-up-to-date") == "true":
                return bytes(out)


async def supervisor_status(data: Path) -> dict[str, Any]:
    async for line in control.request(data, {"op": "status"}, idle_timeout=30):
        if line.get("type") == "result":
            return dict(line["status"])
    raise AssertionError("no status")


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["source", "target", "supervisor"])
async def test_a_sigkill_mid_move_loses_nothing_and_the_move_completes(
    tmp_path: Path, victim: str
) -> None:
    """2 -> 3 shards with big streams moving to the new shard and writers appending; SIGKILL
    the source shard, the target shard or the supervisor while streams are in flight. After
    the restart (by the supervisor, or a new `up` that resumes the journaled scale) the
    cluster serves on 3 shards and every stream holds exactly what was acknowledged."""
    data = tmp_path / "data"
    up = UpProcess(data, _free_ports("127.0.0.1", 1)[0], tmp_path / "logs")
    three = Ring(2, record.shard_ids(3))
    movers = [p for p in (f"big-{i}" for i in range(200)) if three.owner(p) == "shard-2"][:4]
    smalls = [f"small-{i}" for i in range(12)]
    try:
        async with trio.open_nursery() as nursery:
            await up.start(nursery, "--shards", "2")
            async with httpx.AsyncClient(base_url=up.url, timeout=60) as client:
                for path in movers:
                    assert (
                        await client.put(f"/v1/stream/{path}", headers=BINARY)
                    ).status_code == 201
                    body = big_body(path)
                    for at in range(0, BIG, PIECE):
                        response = await client.post(
                            f"/v1/stream/{path}", headers=BINARY, content=body[at : at + PIECE]
                        )
                        assert response.status_code in (200, 204), response.text
                await put_streams(client, smalls)
                appenders = [Appender(client, p) for p in smalls]
                stop = trio.Event()
                async with trio.open_nursery() as load:
                    for appender in appenders:
                        load.start_soon(appender.run, stop)
                    await trio.sleep(1)
                    scale = ds_cluster_async("scale", "--data-dir", str(data), "--shards", "3")
                    results: list[subprocess.CompletedProcess[str]] = []

                    async def run_scale() -> None:
                        results.append(await scale)

                    load.start_soon(run_scale)
                    # Wait for streams in flight, then kill.
                    killed = await _kill_mid_move(data, up, victim)
                    print(f"killed {victim}: {killed}")
                    if victim == "supervisor":
                        with trio.fail_after(30):
                            while up.process is not None and up.process.returncode is None:
                                await trio.sleep(0.1)
                        await up.start(nursery)  # no --shards: the record, and its journal
                    with trio.fail_after(240):
                        while True:
                            recorded = record.load(data)
                            assert recorded is not None
                            if recorded.scale is None:
                                break
                            await trio.sleep(0.5)
                    await trio.sleep(1)
                    stop.set()
                assert recorded.shards == record.shard_ids(3)
                if victim != "supervisor":
                    assert results and results[0].returncode == 0, results
                    assert "serves on 3 shards" in results[0].stdout
                for path in movers:
                    assert await read_all(client, path) == big_body(path), path
                for appender in appenders:
                    assert not appender.errors, (appender.path, appender.errors)
                    content = (await read_all(client, appender.path)).decode()
                    assert content == appender.path + "".join(appender.acked), appender.path
                status = await supervisor_status(data)
                assert status["ring"]["shards"] == ["shard-0", "shard-1", "shard-2"]
                assert status["scale"] is None
                assert sum(s["streams"] for s in status["shards"].values()) >= len(movers) + 12
            await up.stop()
            nursery.cancel_scope.cancel()
    finally:
        await up.stop()
        print(up.output.decode(errors="replace")[-3000:])
        print_log_tails(tmp_path / "logs")


async def _kill_mid_move(data: Path, up: UpProcess, victim: str) -> str:
    """Wait until a stream is in flight to the new shard, then SIGKILL the victim."""
    with trio.fail_after(120):
        while True:
            try:
                status = await supervisor_status(data)
            except control.ControlError:
                await trio.sleep(0.2)
                continue
            shards = status["shards"]
            sending = [
                sid
                for sid, s in shards.items()
                if s.get("moving_out", {}).get("streams", 0) > 0 and s.get("pid")
            ]
            if sending and "shard-2" in shards and shards["shard-2"].get("pid"):
                break
            await trio.sleep(0.1)
    if victim == "supervisor":
        assert up.process is not None
        up.process.kill()
        return f"supervisor pid {up.process.pid}"
    sid = sending[0] if victim == "source" else "shard-2"
    os.kill(shards[sid]["pid"], 9)
    return f"{sid} pid {shards[sid]['pid']}"
