"""`ds-cluster up` as a child process of the chaos run, so its supervisor can be SIGKILLed.

The in-process `Supervisor` cannot be killed without killing the run. Here the
supervisor is a process of its own on a fixed port (the URL survives a restart); a kill
is SIGKILL to it, and a restart is a new `up` on the same data dir, which must wait for
the old children to let go of the shard locks and the port before it becomes ready.
Children that outlive their supervisor (orphans, a second owner of a shard's files) are
recorded and fail the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ds_cluster.supervisor.cluster import (
    LIFELINE_GRACE,
    SupervisorError,
    _free_ports,
    wait_process_exit,
)

READY_LINE = re.compile(rb"ready at (http://\S+)")
# Old children still running this long after their supervisor was SIGKILLed are orphans.
ORPHAN_DEADLINE = max(LIFELINE_GRACE.values()) + 3.0
STOP_GRACE = 30.0  # SIGTERM to `up` at the end: it stops its children in order


class SupervisorStartError(SupervisorError):
    """`ds-cluster up` exited, or was not ready in time, instead of serving."""


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ...]


def running(pid: int) -> bool:
    """Alive and not a zombie: a zombie holds no lock, port or file any more."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def children_of(pid: int) -> list[int]:
    """Live PIDs whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z" and int(stat[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def child_name(argv: list[str], gateway_index: int) -> str:
    """`shard-K` from a shard's `--id`, else `gateway-N`."""
    if "shard" in argv and "--id" in argv:
        return argv[argv.index("--id") + 1]
    return f"gateway-{gateway_index}"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class ProcessCluster:
    """One `ds-cluster up` process at a time, on a fixed port and data dir."""

    def __init__(
        self,
        options: Any,
        data_dir: str,
        *,
        launcher: Sequence[str] = (sys.executable, "-m", "ds_cluster"),
        ready_timeout: float = 90.0,
    ) -> None:
        self.port = _free_ports("127.0.0.1", 1)[0]  # below the ephemeral range: ours to keep
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(data_dir) / "logs"
        # `--shards` only the first time: a later `up` serves the count the data dir
        # records, which a scale may have changed (another count would scale it back).
        self.first_argv = ["--shards", str(options.shards)]
        self.argv = [*launcher, "up", "--gateways", "1"]
        self.argv += ["--host", "127.0.0.1", "--port", str(self.port), "--data-dir", data_dir]
        self.argv += ["--log-dir", str(self.log_dir)]
        self.argv += ["--long-poll-timeout", str(options.long_poll_timeout)]
        self.argv += ["--sse-max-duration", str(options.sse_max_duration)]
        self.ready_timeout = ready_timeout
        self.process: trio.Process | None = None
        self.generations = 0
        self._orphans: dict[int, str] = {}  # pid -> "shard-0 (pid 123) outlived ..."
        # Children of every killed supervisor, checked again when the run ends.
        self._killed: list[tuple[int, dict[str, int]]] = []
        self._nursery: trio.Nursery | None = None

    @property
    def orphans(self) -> list[str]:
        """Children that outlived their supervisor by more than ORPHAN_DEADLINE."""
        return list(self._orphans.values())

    # ---- the Cluster protocol ---------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start `up`, report ready, keep it (and its successors) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._start()
                task_status.started()
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop()
                nursery.cancel_scope.cancel()

    def child_pids(self) -> dict[str, int]:
        """The current supervisor's live children, by name."""
        if self.process is None or self.process.returncode is not None:
            return {}
        pids: dict[str, int] = {}
        gateways = 0
        for pid in children_of(self.process.pid):
            name = child_name(_cmdline(pid), gateways)
            gateways += name.startswith("gateway-")
            pids[name] = pid
        return pids

    def owns(self, pid: int) -> bool:
        """True if `pid` is a live child of the current supervisor (safe to signal)."""
        stat = _stat(pid)
        return (
            stat is not None
            and stat[0] != "Z"
            and self.process is not None
            and self.process.returncode is None
            and int(stat[1]) == self.process.pid
        )

    # ---- supervisor faults ------------------------------------------------------------

    def kill_supervisor(self) -> int:
        """SIGKILL the supervisor (its children are left to their lifeline); its PID."""
        assert self.process is not None and self._nursery is not None
        process = self.process
        children = self.child_pids()
        process.kill()
        self._killed.append((process.pid, children))
        self._nursery.start_soon(self._expect_gone, process.pid, children)
        return process.pid

    async def restart_supervisor(self) -> None:
        """Reap the killed supervisor and start a new `up` on the same data dir."""
        assert self.process is not None
        await self.process.wait()
        await self._start()

    # ---- internals --------------------------------------------------------------------

    async def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.generations += 1
        log_path = self.log_dir / "supervisor.log"
        with open(log_path, "ab") as log:
            argv = self.argv + (self.first_argv if self.generations == 1 else [])
            log.write(f"--- generation {self.generations}: {' '.join(argv)}\n".encode())
            log.flush()
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
            )
        self.process = process
        assert self._nursery is not None and process.stdout is not None
        try:
            with trio.fail_after(self.ready_timeout):
                await self._nursery.start(self._watch_stdout, process)
        except (trio.TooSlowError, SupervisorStartError) as exc:
            tail = log_path.read_text(errors="replace").splitlines()[-10:]
            raise SupervisorStartError(
                f"ds-cluster up (generation {self.generations}) did not become ready: "
                f"{exc or 'timeout'}; its log ends:\n" + "\n".join(tail)
            ) from None

    async def _watch_stdout(self, process: trio.Process, *, task_status: Any) -> None:
        """Report readiness from `up`'s ready line, then drain its stdout until it exits."""
        assert process.stdout is not None
        out = bytearray()
        while READY_LINE.search(out) is None:
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise SupervisorStartError(f"exited with code {await process.wait()}")
            out.extend(chunk)
        task_status.started()
        while await process.stdout.receive_some():
            pass

    async def _expect_gone(self, supervisor_pid: int, children: dict[str, int]) -> None:
        """Every child of a killed supervisor must exit within ORPHAN_DEADLINE."""
        with trio.move_on_after(ORPHAN_DEADLINE):
            for pid in children.values():
                while running(pid) and await wait_process_exit(pid):
                    pass
                while running(pid):  # no pidfd: look again shortly
                    await trio.sleep(0.05)
        for name, pid in children.items():
            if running(pid):
                self._orphans[pid] = (
                    f"{name} (pid {pid}) outlived its supervisor (pid {supervisor_pid}) "
                    f"by more than {ORPHAN_DEADLINE:g} s"
                )

    async def _stop(self) -> None:
        """SIGTERM the current supervisor (it stops its children); check that no child of
        it, or of any supervisor killed during the run, is left."""
        generations = list(self._killed)
        process = self.process
        if process is not None and process.returncode is None:
            children = self.child_pids()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
            if process.returncode is None:
                self._orphans[process.pid] = f"supervisor pid {process.pid} ignored SIGTERM"
                process.kill()
                await process.wait()
            generations.append((process.pid, children))
        for supervisor_pid, children in generations:
            await self._expect_gone(supervisor_pid, children)
            # A child its supervisor could not stop is ours to end: this run started it.
            for pid in children.values():
                if running(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
