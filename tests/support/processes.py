"""Shard and gateway processes a test starts by hand (outside the supervisor).

Each runs `python -m ds_cluster ...` from the repository root with the test cluster
secret, reports its address once it listens, and keeps its stderr lines for the test to
read (`.lines`).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from support.auth import env_without_secret, secret_args
from support.fakeshard import ThreadedShard

REPO_ROOT = Path(__file__).resolve().parents[2]


def rss(pid: int) -> int:
    """Resident set size of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class GatewayProcess:
    """`ds-cluster gateway` with the test cluster secret (`extra` options come last, so a
    test may pass another --cluster-secret-file)."""

    def __init__(self, shards: str, *extra: str) -> None:
        self._secret_dir = tempfile.TemporaryDirectory()
        argv = [
            sys.executable,
            "-m",
            "ds_cluster.cli",
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            shards,
            *secret_args(Path(self._secret_dir.name)),
            *extra,
        ]
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 30
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on http://" in line:
                self.url = line.rsplit(" ", 1)[1].strip()
                break
            assert time.monotonic() < deadline, "gateway did not start"
        assert self.url, "".join(self.lines)
        self.port = int(self.url.rsplit(":", 1)[1])
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_ready(self, expect: int = 200, timeout: float = 10) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            response = httpx.get(f"{self.url}/readyz")
            if response.status_code == expect or time.monotonic() > deadline:
                return response
            time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._secret_dir.cleanup()


@contextmanager
def gateway_for(shard: ThreadedShard, *extra: str) -> Iterator[GatewayProcess]:
    """A ready gateway process in front of `shard`; stopped after, and it must exit 0."""
    gw = GatewayProcess(f"s1=127.0.0.1:{shard.shard.port}", *extra)
    try:
        assert gw.wait_ready().status_code == 200
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, "".join(gw.lines[-30:])


class ShardProcess:
    """`ds-cluster shard` started by hand (a one-shard ring unless `peers` says more)."""

    def __init__(
        self,
        tmp: Path,
        shard_id: str = "shard-0",
        *extra: str,
        port: int | None = None,
        peers: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.shard_id = shard_id
        self.port = port or free_port()
        argv = [sys.executable, "-m", "ds_cluster", "shard", "--id", shard_id]
        argv += ["--listen", f"127.0.0.1:{self.port}", "--data-dir", str(tmp / shard_id)]
        argv += ["--peers", peers or f"{shard_id}=127.0.0.1:{self.port}", *extra]
        (tmp / shard_id).mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env=env or env_without_secret()
        )
        self.lines: list[str] = []
        if not wait:
            return
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving on" in line:
                break
            assert time.monotonic() < deadline, "shard did not start"
        assert self.proc.poll() is None, "".join(self.lines)
        threading.Thread(target=self._drain, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def status_kib(self, field: str) -> int:
        """VmRSS / VmHWM of the process, in KiB (from /proc/PID/status)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
