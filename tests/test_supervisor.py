"""The supervisor: restarts dead children, stops them all on shutdown, guards its data dir."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor, SupervisorError

REPO = Path(__file__).resolve().parent.parent


def _children_of(pid: int) -> set[int]:
    """PIDs whose parent is `pid` (every thread's children: trio spawns from a worker)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..."; comm may contain spaces or parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _answers(client: httpx.AsyncClient, url: str, expect: bytes, deadline: float) -> None:
    """Wait until GET `url` returns `expect`; the cluster may be mid-restart until then."""
    last = "no answer"
    with trio.move_on_after(deadline) as scope:
        while True:
            try:
                response = await client.get(url)
                if response.status_code == 200 and response.content == expect:
                    return
                last = f"{response.status_code} {response.content[:100]!r}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            await trio.sleep(0.1)
    assert not scope.cancelled_caught, f"{url} did not answer {expect!r} in time: {last}"


@pytest.mark.parametrize("cluster", [2], indirect=True)
async def test_restarts_a_killed_shard(
    cluster: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ds_cluster.supervisor")
    paths = [f"restart-{i}" for i in range(8)]  # enough to land on both shards
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        for path in paths:
            response = await client.put(
                f"/v1/stream/{path}", headers={"content-type": "text/plain"}, content=b"hello"
            )
            assert response.status_code == 201, response.text

        victim = cluster.child_pids()["shard-0"]
        os.kill(victim, signal.SIGKILL)

        with trio.fail_after(10):
            while not any(e.name == "shard-0" for e in cluster.restarts):
                await trio.sleep(0.05)
        event = next(e for e in cluster.restarts if e.name == "shard-0")
        assert event.pid == victim
        assert event.returncode == -signal.SIGKILL
        assert event.delay <= 1.0

        for path in paths:  # acknowledged data survived, and every shard answers again
            await _answers(client, f"/v1/stream/{path}?offset=-1", b"hello", deadline=15)
    with trio.fail_after(5):
        while "shard-0" not in cluster.child_pids():
            await trio.sleep(0.05)
    assert cluster.child_pids()["shard-0"] != victim
    assert not _alive(victim)
    assert any(
        "shard-0" in r.getMessage() and "SIGKILL" in r.getMessage() for r in caplog.records
    ), "restart not logged"


@pytest.mark.parametrize("cluster", [{"shards": 2, "gateways": 2}], indirect=True)
async def test_two_gateways_share_the_port_and_survive_a_gateway_kill(cluster: Supervisor) -> None:
    pids = cluster.child_pids()
    assert {"gateway-0", "gateway-1"} <= pids.keys()
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as client:
        response = await client.put(
            "/v1/stream/two-gateways", headers={"content-type": "text/plain"}, content=b"x"
        )
        assert response.status_code == 201, response.text
        os.kill(pids["gateway-0"], signal.SIGKILL)
        # New connections go to whichever gateway is listening; reads keep working.
        for _ in range(10):
            await _answers(client, "/v1/stream/two-gateways?offset=-1", b"x", deadline=10)
    with trio.fail_after(10):
        while not any(e.name == "gateway-0" for e in cluster.restarts):
            await trio.sleep(0.05)
        while "gateway-0" not in cluster.child_pids():
            await trio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_up_stops_every_child_on_signal(tmp_path: Path, signum: int) -> None:
    """`ds-cluster up` as a user runs it: ready, then a signal, then nothing left behind."""
    argv = [sys.executable, "-m", "ds_cluster", "up", "--shards", "2", "--port", "0"]
    argv += ["--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs")]
    proc = await trio.lowlevel.open_process(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stderr = bytearray()
    try:
        async with trio.open_nursery() as nursery:

            async def drain_stderr() -> None:
                async for chunk in proc.stderr:
                    stderr.extend(chunk)

            nursery.start_soon(drain_stderr)
            out = bytearray()
            with trio.fail_after(60):
                while b"\n" not in out:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, f"up exited early: {stderr.decode(errors='replace')}"
                    out.extend(chunk)
            match = re.search(rb"ready at (http://\S+)", out)
            assert match, out
            url = match.group(1).decode()
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await client.get(f"{url}/readyz")).status_code == 200
            children = _children_of(proc.pid)
            assert len(children) == 3, children  # 2 shards + 1 gateway

            proc.send_signal(signum)
            with trio.fail_after(30):
                returncode = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert returncode == 0, stderr.decode(errors="replace")
    assert not [pid for pid in children if _alive(pid)], "children left running"
    assert b"all children stopped" in stderr


async def test_crash_loop_backs_off_and_startup_fails_clearly(tmp_path: Path) -> None:
    """A child that always dies is restarted with doubling delays; never ready -> error."""
    config = ClusterConfig(
        shards=1,
        port=0,
        data_dir=tmp_path / "data",
        launcher=(sys.executable, "-c", "import sys; sys.exit(3)"),
        ready_timeout=6.0,  # four restarts and their start-up, on a loaded machine too
        restart_initial_delay=0.05,
        restart_max_delay=0.4,
    )
    supervisor = Supervisor(config)
    with pytest.raises(SupervisorError, match="not ready"):
        await supervisor.run()
    delays = [e.delay for e in supervisor.restarts if e.name == "shard-0"]
    assert len(delays) >= 4, supervisor.restarts
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]
    assert max(delays) == 0.4
    assert all(e.returncode == 3 for e in supervisor.restarts)
    assert supervisor.child_pids() == {}


async def test_refuses_a_busy_port(tmp_path: Path) -> None:
    with trio.socket.socket() as busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ClusterConfig(shards=1, port=port, data_dir=tmp_path / "data", owner_wait=0.5)
        with pytest.raises(SupervisorError, match=f"127.0.0.1:{port}"):
            await Supervisor(config).run()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shards", "0"], b"--shards must be at least 1"),
        (["--public-url", "ftp://example.com"], b"expected http(s)://host[:port]"),
        (["--max-body-bytes", "0"], b"--max-body-bytes must be at least 1"),
    ],
)
def test_cli_rejects_bad_flags(flags: list[str], message: bytes) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ds_cluster", "up", *flags],
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
