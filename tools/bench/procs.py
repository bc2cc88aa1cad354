"""Process plumbing: client worker processes, and finding/measuring the server's processes.

Load generators run in separate (spawned) processes so one Python interpreter's GIL is never
the ceiling; each worker reports its own CPU time so the bench can show the client's share.

Server processes are found from the URL's port, via /proc: the processes holding a listening
socket on that port (several with --reuse-port gateways), plus, transitively, the processes
listening on the ports those processes hold established connections to (a gateway's shard
links). For ds-cluster that is every gateway and shard; for the Node reference, the one node
process. `--pids` overrides the discovery.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import platform
import queue
import resource
import time
from collections.abc import Callable, Coroutine
from typing import Any

_CTX = mp.get_context("spawn")


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file soft limit towards `wanted` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def _entry(
    fn: Callable[..., Coroutine[Any, Any, dict[str, Any]]], args: tuple, out: Any, index: int
) -> None:
    raise_nofile(1 << 20)  # load generators hold many sockets: take what the hard limit allows
    cpu0 = time.process_time()
    try:
        result = asyncio.run(fn(*args))
        result["cpu_s"] = time.process_time() - cpu0
        out.put((index, result, None))
    except BaseException as exc:  # report, the parent decides
        out.put((index, None, f"{type(exc).__name__}: {exc}"))


def run_workers(
    fn: Callable[..., Coroutine[Any, Any, dict[str, Any]]],
    args_list: list[tuple],
    timeout: float,
    on_started: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the coroutine fn(*args) in one spawned process per args tuple (each with its own
    asyncio loop); return their result dicts in order.

    `on_started` runs in the parent while the workers work (e.g. the fan-out writer).
    Each result gets `cpu_s`: the worker's own CPU seconds.
    """
    out = _CTX.Queue()
    procs = [
        _CTX.Process(target=_entry, args=(fn, args, out, i), daemon=True)
        for i, args in enumerate(args_list)
    ]
    for p in procs:
        p.start()
    try:
        if on_started is not None:
            on_started()
        results: list[dict[str, Any] | None] = [None] * len(procs)
        deadline = time.monotonic() + timeout
        waiting = len(procs)
        while waiting:
            try:
                index, result, error = out.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bench workers did not finish in {timeout:.0f}s") from None
                dead = [i for i, p in enumerate(procs) if results[i] is None and not p.is_alive()]
                if dead and out.empty():
                    time.sleep(0.2)  # a result may still be in the pipe
                    if out.empty():
                        raise RuntimeError(f"bench worker {dead[0]} died") from None
                continue
            if error is not None:
                raise RuntimeError(f"bench worker {index} failed: {error}")
            results[index] = result
            waiting -= 1
        return [r for r in results if r is not None]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


# --- server processes -------------------------------------------------------------------

_LISTEN = "0A"
_ESTABLISHED = "01"


def _tcp_table() -> list[tuple[int, int, str, int]]:
    """(local_port, remote_port, state, inode) for every TCP socket in this net namespace."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local_port = int(parts[1].rsplit(":", 1)[1], 16)
                    remote_port = int(parts[2].rsplit(":", 1)[1], 16)
                    rows.append((local_port, remote_port, parts[3], int(parts[9])))
        except OSError:
            continue
    return rows


def _socket_owners() -> dict[int, set[int]]:
    """socket inode -> pids holding it (processes we may not inspect are skipped)."""
    owners: dict[int, set[int]] = {}
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit():
            continue
        fd_dir = f"/proc/{pid_s}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owners.setdefault(int(link[8:-1]), set()).add(int(pid_s))
    return owners


def server_pids(port: int) -> list[int]:
    """PIDs serving `port`: its listeners plus the listeners they are connected to."""
    table = _tcp_table()
    owners = _socket_owners()
    listeners: dict[int, set[int]] = {}
    for lport, _r, state, inode in table:
        if state == _LISTEN:
            listeners.setdefault(lport, set()).update(owners.get(inode, ()))
    found: set[int] = set()
    todo = [port]
    seen_ports: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen_ports:
            continue
        seen_ports.add(p)
        new = listeners.get(p, set()) - found
        found |= new
        for lport, rport, state, inode in table:
            # an outbound link from a server process to another listener (gateway -> shard)
            linked = state == _ESTABLISHED and rport in listeners and lport not in listeners
            if linked and owners.get(inode, set()) & new:
                todo.append(rport)
    return sorted(found)


def _proc_entry(path: str, key: str) -> str | None:
    """The text after the colon of the first `key:` line of a /proc file (None if the file
    or the line is missing): the layout of /proc/PID/status, /proc/meminfo, /proc/cpuinfo."""
    try:
        with open(path) as f:
            for line in f:
                name, colon, value = line.partition(":")
                if colon and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _proc_kib(path: str, key: str) -> int:
    """A /proc entry given in kB ("VmRSS:   1234 kB"), as a number (0 if missing)."""
    value = _proc_entry(path, key)
    return int(value.split()[0]) if value else 0


def rss_kib(pid: int) -> int:
    """Resident set size of one process in KiB (0 if it is gone)."""
    return _proc_kib(f"/proc/{pid}/status", "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine() -> dict[str, Any]:
    """What the figures were measured on: they only compare within one machine, and a run's
    JSON should say which (cloud VMs of one size differ in CPU model between boots)."""
    mem_kib = _proc_kib("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _proc_entry("/proc/cpuinfo", "model name") or "?",
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
