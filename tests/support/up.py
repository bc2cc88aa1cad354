"""`ds-cluster up` run as its own process (as users run it), for tests that need the
supervisor's own output or signals rather than a `Supervisor` in the test's loop."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent.parent
READY_TIMEOUT = 60  # seconds; Python start-ups are slow on a loaded machine
STOP_GRACE = 30  # seconds `up` has to stop its children after SIGTERM


async def terminate(process: trio.Process, grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL if it is still running after `grace` seconds; returns once
    it has exited."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


@dataclass
class ReadyUp:
    """A `ds-cluster up` process and what it wrote on stderr up to its `cluster ready` line."""

    process: trio.Process
    stderr: bytes


@asynccontextmanager
async def up_until_ready(*options: str) -> AsyncIterator[ReadyUp]:
    """`ds-cluster up OPTIONS...`, once its stderr said `cluster ready`; terminated after."""
    argv = [sys.executable, "-m", "ds_cluster", "up", *options]
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO
    )
    assert process.stderr is not None
    received = b""
    try:
        with trio.fail_after(READY_TIMEOUT):
            while b"cluster ready" not in received:
                data = await process.stderr.receive_some()
                assert data, received.decode(errors="replace")
                received += data
        yield ReadyUp(process, received)
    finally:
        with trio.CancelScope(shield=True):  # a failed test still stops it and its children
            await terminate(process)
