"""One process per shard directory: an exclusive flock on `<data dir>/shard.lock`.

Two processes writing the same SQLite files corrupt acknowledged data (an orphaned shard
that outlived its supervisor and the new cluster's shard both appended to the same
streams). So the shard itself refuses to run unless it is the directory's only owner,
whoever started it. The lock is `flock(LOCK_EX | LOCK_NB)`: the kernel drops it when the
process dies, however it dies, so a crashed shard never leaves a stale lock behind. The
holder's PID is written into the file for the error message of whoever is refused (the
supervisor probes the same file before starting a cluster).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "shard.lock"


class DataDirBusy(Exception):
    """Another live process holds the directory's lock."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{data_dir} is in use by {holder} (it holds {LOCK_NAME})")
        self.pid = pid


class DataDirLock:
    """Held from `acquire` until the process exits (or `release`)."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Take the lock or raise `DataDirBusy` (naming the holder) without waiting.

        Raises OSError if the lock file can neither be created nor opened."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            # A read-only file or filesystem: flock works on a read-only descriptor too,
            # and the shard starts (refusing writes) rather than not at all.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise DataDirBusy(data_dir, int(text) if text.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # best effort: the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(data_dir, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
