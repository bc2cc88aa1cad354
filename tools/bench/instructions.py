"""Instructions per append of one cluster process, counted by callgrind.

    python -m ds_cluster.tools.bench.instructions --process gateway|shard [--appends N]
        [--connections C] [--streams S] [--shards K] [--synchronous FULL|NORMAL]
        [--keep FILE]

Wall-clock CPU figures on a shared 2-core VM move by 10-20% between runs; the number of
instructions a process executes for the same requests does not. This starts a small
cluster of its own (K shards and one gateway on free 127.0.0.1 ports, a fresh data
directory and cluster secret), with the chosen process (the gateway, or shard-0) under
`valgrind --tool=callgrind --instr-atstart=no`, creates the streams, warms up with the
same load, then counts exactly N appends of 100 bytes sent over C keep-alive connections
(round robin over S streams, each connection waiting for its answer): callgrind counts
only between the load's start and end (`callgrind_control` on that process's PID). The
measured process's loop watchdog is kept quiet (`_UNWATCHED`): under valgrind every batch
of the loop is slow, and its stack samples are not the requests' work.

Defaults: a shard is measured alone (`--shards 1`, so it handles every append) with
`--synchronous NORMAL`, so its commits stay on its loop and are counted (under FULL, slow
fsyncs send commits to a worker thread: counted too, but the split varies); the gateway
is measured in front of 2 shards. Measure the code before and after a change with the
same flags. `--keep FILE` keeps the dump for `callgrind_annotate FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BODY = b"x" * 99 + b"\n"
# The measured process runs through this: under valgrind every scheduler batch is slow,
# and the loop watchdog's stack samples (common/watchdog.py) would be counted as the
# requests' work, a different amount each run. Its threshold is raised out of reach.
_UNWATCHED = (
    "import runpy, sys\n"
    "from ds_cluster.common import watchdog\n"
    "install = watchdog.install\n"
    "watchdog.install = lambda name, threshold=0.0: install(name, 3600.0)\n"
    "sys.argv = ['ds_cluster', *sys.argv[1:]]\n"
    "runpy.run_module('ds_cluster', run_name='__main__', alter_sys=True)\n"
)
WARM_UP = 500  # appends before counting starts (caches, first connections, code paths)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _appends(port: int, paths: list[str], total: int, connections: int) -> None:
    """Send exactly `total` appends over `connections` keep-alive connections, each
    waiting for its answer; raise on anything but a 2xx."""
    left = total

    async def one_connection(first: int) -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            turn = first  # connection c takes streams c, c + connections, ...: all of them
            while left > 0:
                left -= 1
                path = paths[turn % len(paths)]
                turn += connections
                writer.write(
                    b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                    b"content-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n%s"
                    % (path.encode(), len(BODY), BODY)
                )
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                if not 200 <= status < 300:
                    raise RuntimeError(f"append answered {status}")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
        finally:
            writer.close()

    await asyncio.gather(*(one_connection(c) for c in range(connections)))


def _request(port: int, method: str, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            "content-type: application/octet-stream\r\ncontent-length: 0\r\n"
            "connection: close\r\n\r\n".encode()
        )
        return int(sock.recv(64).split(b" ", 2)[1])


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited while starting")
        try:
            if _request(port, "GET", "/readyz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the cluster was not ready within {timeout:.0f} s")


def _commits(port: int) -> int:
    """Group commits so far, over every shard (the gateway's /metrics)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    return sum(
        int(float(line.rsplit(b" ", 1)[1]))
        for line in data.split(b"\n")
        if line.startswith(b"ds_commit_batch_size_count")
    )


def _callgrind(pid: int, *command: str) -> None:
    """`callgrind_control COMMAND PID`: always with the PID (without one it acts on every
    process running under callgrind on the machine)."""
    done = subprocess.run(["callgrind_control", *command, str(pid)], capture_output=True, text=True)
    if done.returncode != 0 or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(command)}: {done.stdout}{done.stderr}")


def measure(args: argparse.Namespace) -> tuple[float, float]:
    """Instructions of the measured process per counted append, and appends per group
    commit over the count (a process that commits in smaller groups spends more per
    append: compare like with like)."""
    work = Path(tempfile.mkdtemp(prefix="ds-instructions-"))
    procs: list[subprocess.Popen[bytes]] = []
    out = work / "callgrind.out"
    try:
        secret = work / "cluster.secret"
        secret.write_bytes(secrets.token_hex(32).encode())
        secret.chmod(0o600)
        shards = {f"shard-{i}": _free_port() for i in range(args.shards)}
        peers = ",".join(f"{sid}=127.0.0.1:{port}" for sid, port in shards.items())
        common = ["--ring-version", "1", "--cluster-secret-file", str(secret)]
        common += ["--log-level", "WARNING"]
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
        ]
        python = [sys.executable, "-m", "ds_cluster"]
        measured = None
        for sid, port in shards.items():
            cmd = python + ["shard", "--id", sid, "--listen", f"127.0.0.1:{port}"]
            cmd += ["--data-dir", str(work / sid), "--peers", peers]
            cmd += ["--synchronous", args.synchronous, *common]
            if args.process == "shard" and measured is None:
                cmd = valgrind + [sys.executable, "-c", _UNWATCHED] + cmd[len(python) :]
            procs.append(subprocess.Popen(cmd, start_new_session=True))
            if args.process == "shard" and measured is None:
                measured = procs[-1]
        gateway_port = _free_port()
        cmd = python + ["gateway", "--listen", f"127.0.0.1:{gateway_port}", "--shards", peers]
        cmd += common
        if args.process == "gateway":
            cmd = valgrind + [sys.executable, "-c", _UNWATCHED] + cmd[len(python) :]
        procs.append(subprocess.Popen(cmd, start_new_session=True))
        if measured is None:
            measured = procs[-1]
        _wait_ready(gateway_port, procs[-1], timeout=180)
        paths = [f"/v1/stream/instructions-{i}" for i in range(args.streams)]
        for path in paths:
            status = _request(gateway_port, "PUT", path)
            if status not in (200, 201):
                raise RuntimeError(f"creating {path} answered {status}")
        asyncio.run(_appends(gateway_port, paths, WARM_UP, args.connections))
        commits = _commits(gateway_port)
        _callgrind(measured.pid, "-i", "on")
        asyncio.run(_appends(gateway_port, paths, args.appends, args.connections))
        _callgrind(measured.pid, "-d")
        commits = _commits(gateway_port) - commits
        _callgrind(measured.pid, "-i", "off")
        dumps = sorted(glob.glob(f"{out}.*"))
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        total = 0
        with open(dumps[-1]) as dump:
            for line in dump:
                if line.startswith("summary:"):
                    total = int(line.split()[1])
        if args.keep:
            shutil.copy(dumps[-1], args.keep)
        return total / args.appends, args.appends / max(commits, 1)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ds_cluster.tools.bench.instructions",
        description="instructions per append of one cluster process, counted by callgrind",
    )
    parser.add_argument("--process", choices=("gateway", "shard"), required=True)
    parser.add_argument("--appends", type=int, default=2000, help="appends counted")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--shards", type=int, help="default: 1 for a shard, 2 for the gateway")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="NORMAL")
    parser.add_argument("--keep", help="copy the callgrind dump here")
    args = parser.parse_args(argv)
    if args.shards is None:
        args.shards = 1 if args.process == "shard" else 2
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("needs valgrind (with callgrind_control) on the PATH")
    per_append, group = measure(args)
    print(
        f"{args.process}: {per_append:,.0f} instructions per append, {group:.1f} appends per "
        "commit "
        f"({args.appends:,} appends, {args.connections} connections, {args.streams} streams, "
        f"{args.shards} shard{'s' if args.shards > 1 else ''}, synchronous={args.synchronous})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
