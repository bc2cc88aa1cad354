"""A shard's directory has one owner, storage faults cost availability and never data,
and the space of deleted streams goes back to the filesystem.

Real clusters (supervisor, shard and gateway processes, real SQLite) over HTTP. The
findings covered: an orphaned shard and a new one both writing the same files (two
owners corrupted acknowledged data); files made immutable killing the shard with SIGBUS
and a restarted shard staying read-only after they became writable again; space of
deleted streams never reclaimed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio
from support.processes import free_port

from ds_cluster.shard.dirlock import DataDirBusy, DataDirLock

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
JSON = {"content-type": "application/json"}
BINARY = {"content-type": "application/octet-stream"}
STORAGE_503 = "storage unavailable; the write was not applied"


def shard_dir(supervisor, shard_id: str = "shard-0") -> Path:
    return supervisor.data_dir / shard_id


def chattr_works(tmp: Path) -> bool:
    probe = tmp / "chattr-probe"
    probe.touch()
    ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    return ok


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """`chattr +i`: every write fails with EPERM, through already open descriptors too,
    and for root as well (unlike a chmod)."""
    done: list[Path] = []
    try:
        for path in paths:
            subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)


def db_files(directory: Path) -> list[Path]:
    """The database's files, -shm included if there is one (a mapped -shm made immutable
    is what killed the shard with SIGBUS; the shard now keeps no such file)."""
    names = ("shard.db", "shard.db-wal", "shard.db-shm")
    return [directory / name for name in names if (directory / name).exists()]


def db_size(directory: Path) -> int:
    """Bytes the shard's database takes on disk (database, WAL, and -shm if any)."""
    return sum(p.stat().st_size for p in directory.glob("shard.db*"))


class Writer:
    """Appends numbered JSON messages; remembers exactly which were acknowledged."""

    def __init__(self, client: httpx.AsyncClient, path: str) -> None:
        self.client = client
        self.url = f"/v1/stream/{path}"
        self.acked: list[int] = []
        self.n = 0

    async def create(self) -> None:
        r = await self.client.put(self.url, headers=JSON)
        assert r.status_code == 201, r.text

    async def append(self) -> httpx.Response:
        r = await self.client.post(self.url, headers=JSON, content=json.dumps([self.n]))
        if r.status_code in (200, 204):
            self.acked.append(self.n)
        self.n += 1
        return r

    async def read_all(self) -> list[int]:
        messages: list[int] = []
        offset = "-1"
        while True:
            r = await self.client.get(self.url, params={"offset": offset})
            assert r.status_code == 200, (r.status_code, r.text)
            messages += r.json()
            offset = r.headers["stream-next-offset"]
            if r.headers.get("stream-up-to-date") == "true":
                return messages


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    with trio.move_on_after(timeout):
        while not await predicate():
            await trio.sleep(interval)
        return
    pytest.fail(f"not within {timeout}s: {what}")


async def readyz(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/readyz")


def not_ready_for_storage(response: httpx.Response) -> bool:
    """/readyz says 503, naming shard-0 and its storage as the reason."""
    if response.status_code != 503:
        return False
    reasons = response.json().get("shards", {})
    return "storage" in str(reasons.get("shard-0", ""))


# ---- one owner per directory -------------------------------------------------------------


def test_data_dir_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    first = DataDirLock.acquire(tmp_path / "shard-0")
    assert (tmp_path / "shard-0" / "shard.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(DataDirBusy) as refused:
        DataDirLock.acquire(tmp_path / "shard-0")  # a second open file: refused too
    assert refused.value.pid == os.getpid() and str(os.getpid()) in str(refused.value)
    first.release()
    DataDirLock.acquire(tmp_path / "shard-0").release()


async def test_second_shard_on_the_same_dir_is_refused_naming_the_holder(start_cluster) -> None:
    async with start_cluster(shards=1) as supervisor:
        holder = supervisor.child_pids()["shard-0"]
        directory = shard_dir(supervisor)
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client:
            writer = Writer(client, "owned")
            await writer.create()
            for _ in range(5):
                assert (await writer.append()).status_code in (200, 204)

            argv = [sys.executable, "-m", "ds_cluster", "shard", "--id", "shard-0"]
            argv += ["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(directory)]
            secret = supervisor.data_dir / "cluster.secret"
            if secret.exists():
                argv += ["--cluster-secret-file", str(secret)]
            with trio.fail_after(20):  # it must exit at once, not start serving
                second = await trio.run_process(
                    argv, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
                )
            stderr = second.stderr.decode().strip()
            assert second.returncode == 3, (second.returncode, stderr)
            assert len(stderr.splitlines()) == 1, stderr
            assert f"process {holder}" in stderr and "shard.lock" in stderr, stderr
            assert (directory / "shard.lock").read_text().strip() == str(holder)

            # SQLite itself refuses every other process too (the database stays locked
            # while the shard has it open), and no -shm file is mapped.
            conn = sqlite3.connect(directory / "shard.db", timeout=0.1)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                conn.execute("SELECT count(*) FROM streams").fetchone()
            conn.close()
            assert not (directory / "shard.db-shm").exists()

            # The first shard never noticed.
            assert supervisor.child_pids()["shard-0"] == holder
            for _ in range(5):
                assert (await writer.append()).status_code in (200, 204)
            assert await writer.read_all() == writer.acked == list(range(10))


async def test_lock_is_released_when_the_holder_is_sigkilled(start_cluster) -> None:
    async with start_cluster(shards=1) as supervisor:
        first = supervisor.child_pids()["shard-0"]
        directory = shard_dir(supervisor)
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client:
            writer = Writer(client, "survivor")
            await writer.create()
            for _ in range(50):
                assert (await writer.append()).status_code in (200, 204)
            os.kill(first, signal.SIGKILL)

            async def restarted() -> bool:
                pid = supervisor.child_pids().get("shard-0")
                if pid in (None, first):
                    return False
                try:
                    return (await writer.append()).status_code in (200, 204)
                except httpx.TransportError:
                    return False

            # The new shard took the lock the dead one held: no stale lock, no wait.
            await wait_for(restarted, 30, "a new shard serving after SIGKILL")
            second = supervisor.child_pids()["shard-0"]
            assert (directory / "shard.lock").read_text().strip() == str(second)
            assert await writer.read_all() == writer.acked
            assert writer.acked[:50] == list(range(50))


# ---- storage faults ----------------------------------------------------------------------


async def test_immutable_files_refuse_writes_then_recover_without_a_restart(
    start_cluster, tmp_path: Path
) -> None:
    if not chattr_works(tmp_path):
        pytest.skip("chattr +i is not available here")
    async with start_cluster(shards=1) as supervisor:
        pid = supervisor.child_pids()["shard-0"]
        directory = shard_dir(supervisor)
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client:
            writer = Writer(client, "frozen")
            await writer.create()
            for _ in range(20):
                assert (await writer.append()).status_code in (200, 204)
            acked_before = list(writer.acked)
            # More than the shard keeps in memory for live readers: reading it from the
            # start goes to the database.
            big = os.urandom(100 * 1024)
            await client.put("/v1/stream/frozen-big", headers=BINARY)
            for _ in range(5):
                r = await client.post("/v1/stream/frozen-big", headers=BINARY, content=big)
                assert r.status_code == 204, r.text

            async def storage_not_ready() -> bool:
                return not_ready_for_storage(await readyz(client))

            with immutable(*db_files(directory)):
                # Writes: a clear 503, and certainly not applied.
                for _ in range(5):
                    r = await writer.append()
                    assert r.status_code == 503, (r.status_code, r.text)
                    assert STORAGE_503 in r.text
                r = await client.put("/v1/stream/frozen-new", headers=JSON)
                assert r.status_code == 503, (r.status_code, r.text)
                # Reads of committed data go on, from memory and from the database.
                assert await writer.read_all() == acked_before
                r = await client.get("/v1/stream/frozen-big", params={"offset": "-1"})
                assert r.status_code == 200 and r.content == big * 5, r.status_code
                # Readiness names the shard and says why (once the gateway has pinged it).
                await wait_for(storage_not_ready, 15, "/readyz naming shard-0's storage")
                await trio.sleep(2)  # several reopen attempts fail meanwhile
                assert (await writer.append()).status_code == 503
                assert supervisor.child_pids()["shard-0"] == pid, "the shard died"

            async def writable() -> bool:
                return (await writer.append()).status_code in (200, 204)

            async def ready() -> bool:
                return (await readyz(client)).status_code == 200

            await wait_for(writable, 10, "writes accepted again after chattr -i")
            assert supervisor.child_pids()["shard-0"] == pid, "recovered by a restart"
            await wait_for(ready, 15, "/readyz 200 again")
            assert not (directory / "shard.db-shm").exists()
            messages = await writer.read_all()
            assert messages == writer.acked
            assert messages[:20] == acked_before
            assert len(messages) == 21  # nothing refused was applied


async def test_unopenable_database_at_startup_serves_503_then_opens_by_itself(
    start_cluster, tmp_path: Path
) -> None:
    if not chattr_works(tmp_path):
        pytest.skip("chattr +i is not available here")
    async with start_cluster(shards=1) as supervisor:
        first = supervisor.child_pids()["shard-0"]
        directory = shard_dir(supervisor)
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client:
            writer = Writer(client, "cold")
            await writer.create()
            for _ in range(20):
                assert (await writer.append()).status_code in (200, 204)
            with immutable(*db_files(directory)):
                # The shard crashes while its files are unwritable; the supervisor
                # restarts it, and the new one cannot open its database for writing.
                os.kill(first, signal.SIGKILL)

                async def restarted_and_refusing() -> bool:
                    if supervisor.child_pids().get("shard-0") in (None, first):
                        return False
                    try:
                        return not_ready_for_storage(await readyz(client))
                    except httpx.TransportError:
                        return False

                await wait_for(restarted_and_refusing, 30, "the new shard reporting storage")
                second = supervisor.child_pids()["shard-0"]
                r = await writer.append()
                assert r.status_code == 503, (r.status_code, r.text)
                r = await client.get(writer.url, params={"offset": "-1"})
                assert r.status_code == 503, (r.status_code, r.text)
                await trio.sleep(1.5)
                assert supervisor.child_pids()["shard-0"] == second

            async def writable() -> bool:
                return (await writer.append()).status_code in (200, 204)

            async def ready() -> bool:
                return (await readyz(client)).status_code == 200

            await wait_for(writable, 10, "the database opened once writable")
            assert supervisor.child_pids()["shard-0"] == second, "opened by a restart"
            await wait_for(ready, 15, "/readyz 200 again")
            messages = await writer.read_all()
            assert messages == writer.acked
            assert messages[:20] == list(range(20)) and len(messages) == 21


# ---- space --------------------------------------------------------------------------------


async def test_space_is_reclaimed_after_deleting_a_large_stream(start_cluster) -> None:
    chunk = os.urandom(1024 * 1024)
    async with start_cluster(shards=1) as supervisor:
        directory = shard_dir(supervisor)
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=30) as client:
            await client.put("/v1/stream/small", headers=BINARY)
            await client.post("/v1/stream/small", headers=BINARY, content=b"keep me")
            baseline = db_size(directory)

            await client.put("/v1/stream/large", headers=BINARY)
            for _ in range(40):
                r = await client.post("/v1/stream/large", headers=BINARY, content=chunk)
                assert r.status_code == 204, r.text
            full = db_size(directory)
            assert full >= 40 * len(chunk), full
            assert (await client.delete("/v1/stream/large")).status_code == 204

            async def shrunk() -> bool:
                return db_size(directory) < 12 * 1024 * 1024  # the WAL may keep 8 MiB

            await wait_for(shrunk, 30, f"the database shrinking from {full} bytes")
            print(f"baseline {baseline}, with 40 MiB {full}, after delete {db_size(directory)}")

            # Churn: create, fill, delete, again and again; the files stay bounded.
            sizes = []
            for n in range(6):
                path = f"/v1/stream/churn-{n}"
                await client.put(path, headers=BINARY)
                for _ in range(8):
                    await client.post(path, headers=BINARY, content=chunk)
                assert (await client.delete(path)).status_code == 204
                sizes.append(db_size(directory))
            await wait_for(shrunk, 30, "the database shrinking after churn")
            print("sizes during churn:", sizes)
            assert max(sizes) < 40 * 1024 * 1024, sizes
            r = await client.get("/v1/stream/small", params={"offset": "-1"})
            assert r.content == b"keep me"
