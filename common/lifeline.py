"""A child process ends when its supervisor dies, whatever killed the supervisor.

The supervisor holds the write end of a pipe and never writes to it; every child it
starts inherits the read end and watches it from a small thread. When the supervisor
dies (SIGKILL included) the kernel closes its write end, the child reads EOF, and stops
itself. Without this, children of a killed supervisor keep serving as orphans, and a new
supervisor on the same data directory would start a second owner of every shard.

Why a pipe and not Linux's `prctl(PR_SET_PDEATHSIG)`: the death signal fires when the
*thread* that forked the child exits, not the process. trio starts processes from its
worker threads, which exit after 10 s without work, so a death signal would kill
healthy children soon after every (re)start. A pipe's write end belongs to the process
and closes only when the process is gone. It also lets each role choose how to go: a
shard can take SIGKILL at once (an acknowledged write is already committed), a gateway
gets SIGTERM and a short grace to answer what it is serving, then SIGKILL.

The child learns the descriptor from `ds-cluster --lifeline FD:GRACE <role> ...`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Lifeline:
    """Where to watch, and how long a graceful stop may take (0: SIGKILL at once)."""

    fd: int
    grace: float

    @classmethod
    def parse(cls, text: str) -> Lifeline:
        """`FD` or `FD:GRACE`, as `--lifeline` takes it."""
        fd_text, _, grace_text = text.partition(":")
        try:
            fd, grace = int(fd_text), float(grace_text or 0)
        except ValueError:
            raise ValueError(f"--lifeline wants FD[:GRACE], not {text!r}") from None
        if fd < 0 or not grace >= 0:
            raise ValueError(f"--lifeline wants FD >= 0 and GRACE >= 0, not {text!r}")
        return cls(fd, grace)

    def __str__(self) -> str:
        return f"{self.fd}:{self.grace:g}"


def watch(lifeline: Lifeline) -> threading.Thread:
    """Stop this process when the pipe's writer is gone; returns the (daemon) watcher.

    The descriptor is made non-inheritable first, so a process this one starts does not
    keep its own supervisor's pipe open.
    """
    os.fstat(lifeline.fd)  # fail early, in the caller, on a descriptor we were not given
    os.set_inheritable(lifeline.fd, False)
    thread = threading.Thread(
        target=_stop_when_closed, args=(lifeline,), name="lifeline", daemon=True
    )
    thread.start()
    return thread


def _stop_when_closed(lifeline: Lifeline) -> None:
    """Block until EOF (the supervisor never writes), then signal this very process."""
    while True:
        try:
            if not os.read(lifeline.fd, 4096):
                break
        except OSError:  # the descriptor went bad: no supervisor to answer to either
            break
    if lifeline.grace > 0:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(lifeline.grace)  # a process that exits sooner takes this thread along
    os.kill(os.getpid(), signal.SIGKILL)
