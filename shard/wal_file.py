"""The WAL file at its working size from the start, so that commits overwrite it.

SQLite appends each commit's frames to the WAL and starts it over (from its first frame,
in place) once a checkpoint has copied it all to the database. A new WAL, as every start
of a shard makes one (SQLite deletes the file when the last connection closes), grows with
every commit until then. An `fdatasync` of a file that grew must also commit its new size
to the filesystem's journal; one that only overwrote does not. On this project's 2-core
test machine (ext4), one 4 KiB page written and synced every 10-20 ms took 360-420 us
when it extended the file and 310-370 us when it overwrote it (p90 470-540 against
380-460 us): about 60 us of every commit of a freshly started shard, until the first
checkpoint (1,000 pages) wraps the WAL.

So the WAL is made `size` bytes long once it exists, with zeros past what SQLite wrote.
Zeros are never taken for frames: a frame is valid only with the salt of the WAL's header
and a checksum that chains from the one before, so recovery after a crash stops at the
first zero frame as it stops at any stale frame of an earlier round. SQLite truncates the
file only to its `journal_size_limit`, which is the size given here.

The space is written, not reserved with `fallocate`: writing into a reserved but unwritten
extent changes the file's extent map, which the sync must then journal just the same.

It is space the WAL takes anyway once it has wrapped, but not space to take from a nearly
full disk, where the commits need it more: the WAL is left to grow as it goes unless the
filesystem keeps at least MIN_FREE_AFTER bytes (and a tenth of itself) free afterwards, and a
write that fails midway is undone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # zeros written per call
MIN_FREE_AFTER = 64 << 20  # bytes the filesystem must keep free after pre-sizing


def wal_path(database: Path) -> Path:
    return database.with_name(database.name + "-wal")


def presize(database: Path, size: int) -> None:
    """Extend `database`'s WAL file with zeros to `size` bytes and sync it. Nothing happens
    when it is that long already, does not exist, or its filesystem has no room to spare;
    a failure (a full disk) is logged and leaves the WAL as SQLite left it, to grow as it
    goes."""
    try:
        fd = os.open(wal_path(database), os.O_WRONLY)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.info("cannot open the WAL to pre-size it: %s", exc)
        return
    try:
        start = os.fstat(fd).st_size
        if start < size and room_for(fd, size - start):
            _extend(fd, start, size)
    except OSError as exc:
        log.info("cannot pre-size the WAL (it grows as it goes): %s", exc)
    finally:
        # (SQLite takes no lock on the WAL file itself: closing this descriptor releases
        # none of its locks, which are on the database file)
        os.close(fd)


def _extend(fd: int, start: int, size: int) -> None:
    """Zeros from `start` to `size`, synced; on a failure the file is cut back to `start`
    (the zeros written so far, nothing of SQLite's)."""
    zeros = bytes(_CHUNK)
    end = start
    try:
        while end < size:
            end += os.pwrite(fd, zeros[: size - end], end)
        os.fdatasync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def room_for(where: int | Path, more: int) -> bool:
    """Whether the filesystem of `where` (a descriptor or a path) stays roomy with `more`
    bytes taken."""
    stat = os.statvfs(where)
    free_after = stat.f_bavail * stat.f_frsize - more
    return free_after >= max(MIN_FREE_AFTER, stat.f_blocks * stat.f_frsize // 10)
