"""Scaling a cluster: the data dir's record, `up` on an existing dir, the control socket,
`ds-cluster scale` / `status` / `rebalance`, and live moves under load with kills.

Everything runs real processes (the supervisor in-process or as `ds-cluster up`, shards
and gateways as its children) on real SQLite files in the test's directory.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.cluster import running_cluster

from ds_cluster.supervisor import control, record
from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor, SupervisorError
from ds_cluster.supervisor.record import ClusterRecord, RecordError, ScaleJournal

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
