"""One owner per data dir, however the supervisor ends: `ds-cluster up` as users run it.

Covers the finding "SIGKILL the supervisor: its shards keep serving as orphans, and a new
`up` on the same data dir becomes a second owner of every SQLite file". Every test runs
`ds-cluster up` as its own process, so the supervisor can be SIGKILLed like any other.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from support.up import terminate

from ds_cluster.common.rpc_security import SECRET_FILE_NAME, ensure_secret_file
from ds_cluster.supervisor.cluster import (
    LIFELINE_GRACE,
    ClusterConfig,
    Supervisor,
    _free_ports,
    shard_lock_holder,
)

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 90  # a loaded CI machine starts Python processes slowly
# Children of a killed supervisor must be gone within this many seconds: the longest
# lifeline grace plus time for a busy machine to deliver the signals.
ORPHAN_DEADLINE = max(LIFELINE_GRACE.values()) + 5.0
TEXT = {"content-type": "text/plain"}


@dataclass
class Up:
    """One `ds-cluster up` process, ready at `url`."""

    process: trio.Process
    url: str
    stderr: Path

    def children(self) -> dict[int, list[str]]:
        """PID -> command line of every live child (shards and gateways)."""
        return {pid: _cmdline(pid) for pid in _children_of(self.process.pid)}


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ...]; comm may hold spaces


def _children_of(pid: int) -> set[int]:
    """Live (not zombie) PIDs whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and int(stat[1]) == pid and stat[0] != "Z":
            found.add(int(entry.name))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no lock, port or file any more)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _argv(data_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "ds_cluster", "up", "--shards", "2"]
    return argv + ["--data-dir", str(data_dir), "--log-dir", str(log_dir), *extra]


@asynccontextmanager
async def running_up(tmp_path: Path, name: str, *extra: str) -> AsyncIterator[Up]:
    """`ds-cluster up` on tmp_path/data, ready; stopped by SIGTERM after (if still alive)."""
    stderr_path = tmp_path / f"{name}.stderr"
    argv = _argv(tmp_path / "data", tmp_path / f"logs-{name}", *extra)
    with open(stderr_path, "wb") as stderr:
        process = await trio.lowlevel.open_process(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(_read_until_ready, process, stderr_path)
            yield Up(process, url, stderr_path)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await terminate(process)
        print(f"----- {name}: ds-cluster up stderr -----")
        print(stderr_path.read_text(errors="replace")[-4000:])


async def _read_until_ready(
    process: trio.Process, stderr_path: Path, *, task_status: trio.TaskStatus[str]
) -> None:
    """Report the URL from `up`'s ready line, then keep draining its stdout."""
    assert process.stdout is not None
    out = bytearray()
    with trio.fail_after(READY_TIMEOUT):
        while (match := re.search(rb"ready at (http://\S+)", out)) is None:
            chunk = await process.stdout.receive_some()
            assert chunk, f"up exited early: {stderr_path.read_text(errors='replace')}"
            out.extend(chunk)
    task_status.started(match.group(1).decode())
    while await process.stdout.receive_some():
        pass


async def _write_streams(client: httpx.AsyncClient, tag: str, count: int = 6) -> dict[str, bytes]:
    """Create `count` streams (enough to land on both shards) with a few appends each."""
    expected = {}
    for i in range(count):
        path = f"/v1/stream/{tag}-{i}"
        response = await client.put(path, headers=TEXT)
        assert response.status_code in (200, 201), response.text
        body = b""
        for n in range(5):
            piece = f"{tag}-{i}-{n};".encode()
            response = await client.post(path, headers=TEXT, content=piece)
            assert response.status_code in (200, 204), response.text
            body += piece
        expected[path] = body
    return expected


async def _assert_reads_back(client: httpx.AsyncClient, expected: dict[str, bytes]) -> None:
    for path, body in expected.items():
        response = await client.get(path, params={"offset": "-1"})
        assert response.status_code == 200, response.text
        assert response.content == body, path


def _shard_locks_held(data_dir: Path) -> dict[str, int]:
    return {
        d.name: pid
        for d in sorted(data_dir.glob("shard-*"))
        if (pid := shard_lock_holder(d)) is not None
    }


async def _wait_gone(pids: set[int], deadline: float) -> set[int]:
    """Wait up to `deadline` s for every PID to exit; return those still running."""
    with trio.move_on_after(deadline):
        while any(_running(pid) for pid in pids):
            await trio.sleep(0.05)
    return {pid for pid in pids if _running(pid)}


@pytest.mark.slow
async def test_children_exit_when_the_supervisor_is_sigkilled(tmp_path: Path) -> None:
    async with running_up(tmp_path, "first", "--port", "0") as up:
        children = up.children()
        assert len(children) == 3, children  # 2 shards + 1 gateway
        assert all("--lifeline" in argv for argv in children.values()), children
        up.process.kill()
        await up.process.wait()
        survivors = await _wait_gone(set(children), ORPHAN_DEADLINE)
        assert not survivors, {pid: children[pid] for pid in survivors}
        assert _shard_locks_held(tmp_path / "data") == {}


@pytest.mark.slow
async def test_second_up_on_a_live_data_dir_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    async with (
        running_up(tmp_path, "first", "--port", "0") as up,
        httpx.AsyncClient(base_url=up.url, timeout=15) as client,
    ):
        expected = await _write_streams(client, "first")
        children = up.children()
        argv = _argv(tmp_path / "data", tmp_path / "logs-second", "--port", "0")
        with trio.fail_after(60):
            second = await trio.run_process(
                argv, cwd=REPO, capture_stdout=True, capture_stderr=True, check=False
            )
        assert second.returncode != 0
        assert b"ready at" not in second.stdout
        assert b"is in use" in second.stderr, second.stderr
        assert up.children() == children, "the first cluster's children changed"
        await _assert_reads_back(client, expected)
        more = await _write_streams(client, "after")
        await _assert_reads_back(client, {**expected, **more})


@pytest.mark.slow
async def test_a_new_up_after_a_supervisor_sigkill_serves_everything_acknowledged(
    tmp_path: Path,
) -> None:
    port = str(_free_ports("127.0.0.1", 1)[0])  # the same URL for both supervisors
    async with running_up(tmp_path, "first", "--port", port) as first:
        async with httpx.AsyncClient(base_url=first.url, timeout=15) as client:
            expected = await _write_streams(client, "before")
        old_children = set(first.children())
        first.process.kill()
        await first.process.wait()
        # Started at once: it waits for the old children to let go of the locks and port.
        async with (
            running_up(tmp_path, "second", "--port", port) as second,
            httpx.AsyncClient(base_url=second.url, timeout=15) as client,
        ):
            assert second.url == first.url
            assert not [pid for pid in old_children if _running(pid)], "orphans survived"
            await _assert_reads_back(client, expected)
            more = await _write_streams(client, "after")
            await _assert_reads_back(client, {**expected, **more})


@pytest.mark.slow
async def test_second_up_is_refused_while_a_shard_outside_any_supervisor_holds_its_dir(
    tmp_path: Path,
) -> None:
    """A shard started by hand (or left by an older supervisor) owns its directory: `up`
    waits a few seconds for it, then refuses, naming it, and the shard is left alone."""
    data = tmp_path / "data"
    (data / "shard-0").mkdir(parents=True)
    port = _free_ports("127.0.0.1", 1)[0]
    argv = [sys.executable, "-m", "ds_cluster", "shard", "--id", "shard-0"]
    argv += ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data / "shard-0")]
    argv += ["--peers", f"shard-0=127.0.0.1:{port},shard-1=127.0.0.1:1"]
    argv += ["--cluster-secret-file", str(ensure_secret_file(data / SECRET_FILE_NAME))]
    with open(tmp_path / "shard.log", "wb") as shard_log:
        shard = await trio.lowlevel.open_process(
            argv, cwd=REPO, stdout=shard_log, stderr=subprocess.STDOUT
        )
    try:
        with trio.move_on_after(30):
            while shard_lock_holder(data / "shard-0") is None:
                assert shard.returncode is None, (tmp_path / "shard.log").read_text()
                await trio.sleep(0.05)
        assert shard_lock_holder(data / "shard-0") == shard.pid, "the shard took no lock"
        with trio.fail_after(60):
            up = await trio.run_process(
                _argv(data, tmp_path / "logs", "--port", "0"),
                cwd=REPO,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert up.returncode != 0
        message = up.stderr.decode(errors="replace")
        assert f"shard-0 (pid {shard.pid}) is still running; stop it first" in message, message
        assert shard.returncode is None and _running(shard.pid)
    finally:
        shard.kill()
        await shard.wait()


async def test_shards_listen_on_shard_host_whatever_the_gateways_host(tmp_path: Path) -> None:
    """`up --host 0.0.0.0` exposes the gateways only: shard ports stay on loopback."""
    (tmp_path / "data").mkdir()
    config = ClusterConfig(shards=2, host="0.0.0.0", port=0, data_dir=tmp_path / "data")
    supervisor = Supervisor(config)
    supervisor._build_children(port=4437)  # command lines only: nothing is started
    argvs = {child.name: child.argv for child in supervisor._children}
    for sid in ("shard-0", "shard-1"):
        listen = argvs[sid][argvs[sid].index("--listen") + 1]
        assert listen.startswith("127.0.0.1:"), argvs[sid]
    assert "0.0.0.0:4437" in argvs["gateway-0"], argvs["gateway-0"]


@pytest.mark.slow
async def test_up_binds_shards_to_shard_host_and_passes_gateway_options(tmp_path: Path) -> None:
    """Gateways on --host, shards on --shard-host (two loopback addresses, so nothing leaves
    this machine); --max-body-bytes, --log-level and --access-log reach the children, and
    the gateways build Location from up's URL (--public-url), whatever Host says."""
    extra = ["--port", "0", "--host", "127.0.0.1", "--shard-host", "127.0.0.2"]
    extra += ["--max-body-bytes", "1000", "--log-level", "debug", "--access-log"]
    async with (
        running_up(tmp_path, "hosts", *extra) as up,
        httpx.AsyncClient(base_url=up.url, timeout=15) as client,
    ):
        by_role = {"shard": [], "gateway": []}
        for argv in up.children().values():
            role = "shard" if "shard" in argv else "gateway"
            by_role[role].append(argv)
        assert len(by_role["shard"]) == 2 and len(by_role["gateway"]) == 1, by_role
        gateway = by_role["gateway"][0]
        gateway_port = int(gateway[gateway.index("--listen") + 1].rsplit(":", 1)[1])
        for argv in by_role["shard"]:
            host, port = argv[argv.index("--listen") + 1].rsplit(":", 1)
            assert host == "127.0.0.2", argv
            assert argv[argv.index("--log-level") + 1] == "DEBUG", argv
            with socket.create_connection((host, int(port)), timeout=5):
                pass  # listening there...
            if int(port) == gateway_port:
                continue  # the same number on the other address is the gateway's own
            with pytest.raises(ConnectionRefusedError):  # ...and not on the gateways' host
                socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
        assert gateway[gateway.index("--listen") + 1].startswith("127.0.0.1:"), gateway
        assert gateway[gateway.index("--max-body-bytes") + 1] == "1000", gateway
        assert gateway[gateway.index("--log-level") + 1] == "DEBUG", gateway
        assert "--access-log" in gateway
        assert gateway[gateway.index("--public-url") + 1] == up.url, gateway
        response = await client.put("/v1/stream/big", headers={**TEXT, "host": "evil.example"})
        assert response.status_code == 201, response.text
        assert response.headers["location"] == f"{up.url}/v1/stream/big"
        response = await client.post("/v1/stream/big", headers=TEXT, content=b"x" * 2000)
        assert response.status_code == 413, response.text
        response = await client.post("/v1/stream/big", headers=TEXT, content=b"x" * 500)
        assert response.status_code in (200, 204), response.text


def test_lifeline_flag_is_parsed_before_the_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ds_cluster", "--lifeline", "x:1", "up", "--help"],
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"--lifeline wants FD[:GRACE]" in result.stderr
    result = subprocess.run(  # a descriptor this process was not given
        [sys.executable, "-m", "ds_cluster", "--lifeline", "77", "up", "--shards", "0"],
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"--lifeline 77:0: Bad file descriptor" in result.stderr


async def test_a_child_with_a_lifeline_stops_gracefully_then_for_good(tmp_path: Path) -> None:
    """The gateway's way out: SIGTERM when the pipe closes, SIGKILL after the grace if the
    process is still there (here: one that ignores SIGTERM)."""
    read_end, write_end = os.pipe()
    script = (
        "import signal, sys, time\n"
        "from common.lifeline import Lifeline, watch\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('term', flush=True))\n"
        f"watch(Lifeline({read_end}, 0.5))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, pass_fds=(read_end,)
    )
    os.close(read_end)
    assert process.stdout is not None
    write_open = True
    try:
        out = bytearray()
        with trio.fail_after(30):
            while b"ready" not in out:
                out.extend(await process.stdout.receive_some())
        os.close(write_end)  # as if the supervisor died
        write_open = False
        with trio.fail_after(15):
            while b"term" not in out:
                out.extend(await process.stdout.receive_some())
            assert await process.wait() == -signal.SIGKILL
    finally:
        if write_open:
            os.close(write_end)
        if process.returncode is None:
            process.kill()
            await process.wait()
