"""Bench targets: a URL of a running server, or a server the bench starts and stops itself.

Spec forms (for --url and --vs):
  http(s)://HOST:PORT[/prefix]  a running server (prefix defaults to /v1/stream; https is
                              verified against --cacert, else the system's CAs)
  ref:file | ref:memory       the Node reference server (conformance/start-reference.sh),
                              file-backed in a temporary data dir, or in memory
  baseline[:W]                tools.bench.baseline (bare ASGI on hypercorn-trio, W workers)
  up                          `ds-cluster up` with its defaults on a temporary data dir
  up:S[xG]                    `ds-cluster up --shards S --gateways G` on a temporary data dir
  up[:S[xG]]:normal           the same with `--synchronous NORMAL`: a commit does not wait
                              for fsync, so appends are not durable one by one. Not a
                              configuration to run; it isolates what the fsync costs (run
                              side by side with the same cluster at its FULL default)
  rakaia                      rakaia-streams under uvicorn (uvloop, httptools), in memory,
                              installed on first use into its own venv (tools/bench/rakaia.py)
Managed servers bind 127.0.0.1 on a free port and are stopped by PID when the bench ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from . import rakaia
from .http import SyncClient, Target
from .procs import raise_nofile, server_pids

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nofile_to_hard_limit() -> None:
    raise_nofile(1 << 20)


def up_options(spec: str) -> list[str]:
    """The `ds-cluster up` options an `up[:S[xG]][:normal]` spec stands for."""
    shape = spec.removeprefix("up").removeprefix(":")
    options = []
    if shape == "normal" or shape.endswith(":normal"):
        shape = shape.removesuffix("normal").removesuffix(":")
        options = ["--synchronous", "NORMAL"]
    if shape:
        shards, _, gateways = shape.partition("x")
        if not shards.isdigit() or not (gateways or "1").isdigit():
            raise ValueError(f"up, up:S[xG] or up[:S[xG]]:normal, not {spec!r}")
        options = ["--shards", shards, "--gateways", gateways or "1", *options]
    return options


class BenchTarget:
    """One server under test; `kind` is "stream" (a Durable Streams server) or "sink"."""

    def __init__(
        self,
        spec: str,
        pids: list[int] | None = None,
        log_dir: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        cacert: str | None = None,
    ):
        self.spec = spec
        self.headers = headers  # sent with every request (e.g. Authorization)
        self.cacert = cacert
        self.kind = "sink" if spec.startswith("baseline") else "stream"
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None
        self.fixed_pids = pids
        self.log_dir = log_dir
        self.log: BinaryIO | None = None
        self.target: Target

    @property
    def label(self) -> str:
        return self.spec if not self.spec.startswith("http") else self.spec.split("//", 1)[1]

    def start(self) -> None:
        spec = self.spec
        if spec.startswith(("http://", "https://")):
            self.target = Target.parse(spec, self.headers, self.cacert)
            return
        port = free_port()
        if spec.startswith("ref:"):
            mode = spec[4:]
            cmd = [str(REPO / "conformance" / "start-reference.sh"), "--port", str(port)]
            if mode == "file":
                self.tmp = tempfile.mkdtemp(prefix="bench-ref-")
                cmd += ["--data-dir", self.tmp]
            elif mode != "memory":
                raise ValueError(f"ref:file or ref:memory, not {spec!r}")
        elif spec.startswith("baseline"):
            workers = spec.partition(":")[2] or "1"
            cmd = [
                sys.executable,
                "-m",
                "ds_cluster.tools.bench.baseline",
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                workers,
            ]
        elif spec == "rakaia":
            cmd = rakaia.command(rakaia.ensure_venv(), port)
        elif spec == "up" or spec.startswith("up:"):
            self.tmp = tempfile.mkdtemp(prefix="bench-up-")
            cmd = [
                sys.executable,
                "-m",
                "ds_cluster.cli",
                "up",
                *up_options(spec),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                self.tmp,
            ]
        else:
            raise ValueError(f"unknown target {spec!r}")
        if self.log_dir:
            name = spec.replace(":", "-").replace("/", "_")
            self.log = open(Path(self.log_dir) / f"server-{name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self.log or subprocess.DEVNULL,
            stderr=self.log or subprocess.DEVNULL,
            start_new_session=True,
            # uvicorn does not raise its own open-file limit (the others do): same footing
            preexec_fn=_nofile_to_hard_limit if spec == "rakaia" else None,
        )
        self.target = Target("127.0.0.1", port, "/v1/stream", headers=self.headers)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the server answers HTTP (a stream server: until a PUT succeeds)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec}: server exited with {self.proc.returncode}")
            try:
                with SyncClient(self.target, timeout=5) as c:
                    if self.kind == "sink":
                        c.request("POST", self.target.path("probe"), b"x")
                        return
                    r = c.request(
                        "PUT",
                        self.target.path("bench-probe"),
                        headers={"content-type": "application/octet-stream"},
                    )
                    if r.status in (200, 201):
                        return
                    last = f"HTTP {r.status}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"{self.spec}: not ready after {timeout:.0f}s ({last})")

    def restart(self) -> None:
        """A fresh server process (empty data dir) for a managed target; a URL stays as is."""
        if self.proc is not None:
            self.stop()
            self.start()

    def pids(self) -> list[int]:
        if self.fixed_pids:
            return self.fixed_pids
        return server_pids(self.target.port)

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # the group was created for this server alone (start_new_session)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
