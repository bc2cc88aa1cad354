"""The WAL file is made its working size when the store opens (`shard.wal_file`): commits
overwrite zeros instead of growing the file, and nothing about durability changes.

Real SQLite files; the crash is a real process killed with SIGKILL between commits.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ds_cluster.shard import wal_file
from ds_cluster.shard.core.model import Record, StreamState
from ds_cluster.shard.store import JOURNAL_SIZE_LIMIT, Batch, Store, StreamWrite


def append(store: Store, sid: int, tail: int, data: bytes) -> int:
    """Commit one record at `tail` of stream `sid`; the new tail."""
    end = tail + len(data)
    state = StreamState(path="s", content_type="application/octet-stream", created_at=1.0, tail=end)
    store.commit(Batch(streams=[StreamWrite("s", sid, sid, state, (Record(tail, end, data),))]))
    return end


def needs_room(path: Path) -> None:
    if not wal_file.room_for(path, JOURNAL_SIZE_LIMIT):
        pytest.skip("the temporary directory's filesystem is too full to pre-size a WAL")


def test_a_new_wal_starts_at_its_working_size_and_keeps_it(tmp_path: Path) -> None:
    needs_room(tmp_path)
    store = Store(tmp_path)
    wal = wal_file.wal_path(store.path)
    assert wal.stat().st_size == JOURNAL_SIZE_LIMIT
    # Past the first automatic checkpoint (1,000 pages), so the WAL has started over.
    tail = 0
    records = [bytes([i % 251]) * 3000 for i in range(1500)]
    for data in records:
        tail = append(store, 1, tail, data)
    assert wal.stat().st_size == JOURNAL_SIZE_LIMIT
    store.close()
    reopened = Store(tmp_path)
    assert [r.data for r in reopened.read_records(1, 0, 1 << 30)] == records
    reopened.close()


def test_presize_only_ever_adds_zeros(tmp_path: Path) -> None:
    database = tmp_path / "db"
    wal = wal_file.wal_path(database)
    wal_file.presize(database, 4096)
    assert not wal.exists()  # no WAL yet: SQLite makes it
    wal.write_bytes(b"frames")
    wal_file.presize(database, 4096)
    assert wal.read_bytes() == b"frames" + bytes(4090)
    wal.write_bytes(b"x" * 5000)
    wal_file.presize(database, 4096)
    assert wal.read_bytes() == b"x" * 5000


CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.test_wal_file import append
    from ds_cluster.shard.store import Store

    store = Store(Path(sys.argv[1]))
    tail = 0
    for n in range(1, 100_000):
        tail = append(store, 1, tail, b"%06d" % n)
        print(n, flush=True)  # acknowledged: committed
    """
)


def test_a_crash_loses_nothing_committed_to_a_presized_wal(tmp_path: Path) -> None:
    """A writer killed between commits (its WAL holds committed frames, then zeros): the
    reopened store has every acknowledged record, in order, and nothing else."""
    needs_room(tmp_path)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout is not None
    acknowledged = 0
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged == 300:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    proc.stdout.close()
    assert acknowledged == 300
    assert wal_file.wal_path(tmp_path / "shard.db").stat().st_size == JOURNAL_SIZE_LIMIT
    store = Store(tmp_path)
    data = [r.data for r in store.read_records(1, 0, 1 << 30)]
    store.close()
    # The kill lands after the 300th acknowledgement; more commits may have followed it.
    assert len(data) >= 300
    assert data == [b"%06d" % n for n in range(1, len(data) + 1)]


def test_presize_leaves_a_nearly_full_filesystem_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zeros never take space that commits may need: with less free space than the
    WAL's growth plus the margin, nothing is written."""
    database = tmp_path / "db"
    wal = wal_file.wal_path(database)
    wal.write_bytes(b"frames")
    stat = os.statvfs(tmp_path)
    monkeypatch.setattr(wal_file, "MIN_FREE_AFTER", stat.f_bavail * stat.f_frsize)
    wal_file.presize(database, 4096)
    assert wal.read_bytes() == b"frames"


def test_a_presize_that_fails_midway_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up (ENOSPC) after the first chunk: the zeros written are taken back,
    and the WAL is as SQLite left it."""
    database = tmp_path / "db"
    wal = wal_file.wal_path(database)
    wal.write_bytes(b"frames")
    real_pwrite = os.pwrite
    calls = []

    def pwrite_until_full(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_until_full)
    wal_file.presize(database, 3 * (1 << 20))
    assert len(calls) == 2
    assert wal.read_bytes() == b"frames"
