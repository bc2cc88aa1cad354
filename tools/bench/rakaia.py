"""The `rakaia` bench target: `rakaia-streams`, a single-process Python Durable Streams server
(in memory), served by uvicorn with uvloop and httptools.

It is installed on first use into a venv of its own, outside the repository and the project's
venv, so its dependencies never mix with ours:
`$XDG_CACHE_HOME/ds-cluster/bench/rakaia-<version>` (else `~/.cache/...`), created with the
running Python's `-m venv`. A venv is only used once its install finished (it is built under
a temporary name and renamed), so an interrupted install is redone, not half-used.

rakaia takes the whole request path as the stream's name, so the bench's usual /v1/stream
prefix works as is. Read its figures knowing that it keeps everything in memory (no fsync:
its peer is `ref:memory`, not `ref:file`); it has no forks (the conformance suite's 56 fork
tests fail, the other 276 pass); its long-poll window is 3 s (ours 30 s) and an SSE response
sends a control event every 3 s; and it does not notice an SSE client that went away (no
`http.disconnect` handling), so those handlers keep running and cost CPU until the server
stops: run with `--fresh` when that should not carry over into later scenarios.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.9.0"
# What the bench was tested with; pinned so a peer's numbers do not move under us.
PINS = (
    f"rakaia-streams=={VERSION}",
    "uvicorn==0.55.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
)
_MARKER = "ds-cluster-bench-installed"


class TargetUnavailable(RuntimeError):
    """A managed target cannot be installed or started here (the message is one line)."""


def cache_dir() -> Path:
    """Where the rakaia venv lives: the user's cache, never the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ds-cluster" / "bench" / f"rakaia-{VERSION}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed(venv: Path) -> bool:
    marker = venv / _MARKER
    return marker.is_file() and marker.read_text().split() == list(PINS)


def ensure_venv(venv: Path | None = None) -> Path:
    """The rakaia venv's python, installing the pinned packages first if they are not there.

    Raises TargetUnavailable with a one-line reason when that fails (no network, no venv
    module, no wheel for this platform)."""
    venv = venv or cache_dir()
    if _installed(venv):
        return _python(venv)
    building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
    print(f"# installing {' '.join(PINS)} into {venv} ...", file=sys.stderr)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(building, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(building)], "python -m venv")
        pip = [str(_python(building)), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, "--quiet", *PINS], "pip install")
        (building / _MARKER).write_text("\n".join(PINS) + "\n")
        shutil.rmtree(venv, ignore_errors=True)  # an older, unfinished or differently pinned one
        try:
            building.rename(venv)
        except OSError:
            if not _installed(venv):  # not another bench that finished first: a real failure
                raise
    except OSError as exc:
        raise TargetUnavailable(f"rakaia: cannot install into {venv}: {exc}") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return _python(venv)


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TargetUnavailable(f"rakaia: {what} failed: {exc}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise TargetUnavailable(f"rakaia: {what} failed: {last}")


def command(python: Path, port: int) -> list[str]:
    """uvicorn serving `rakaia:app` on 127.0.0.1:port, one process, uvloop and httptools."""
    return [
        str(python),
        "-m",
        "uvicorn",
        "rakaia:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
        "--timeout-keep-alive",
        "65",
        "--timeout-graceful-shutdown",
        "5",
    ]
