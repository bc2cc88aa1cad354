"""Shards crash and restart; what was acknowledged is all still there, byte for byte.

Real shard and gateway processes under the supervisor, real SQLite files, real HTTP.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
import trio

from ds_cluster.common.ring import Ring

pytestmark = pytest.mark.slow

BINARY = "application/octet-stream"


def owner_map(supervisor) -> Ring:
    return Ring(1, tuple(supervisor.shard_ids))


def path_on(ring: Ring, shard_id: str, prefix: str) -> str:
    """A fresh stream path that the ring places on `shard_id`."""
    for i in range(10_000):
        path = f"{prefix}-{i}-{random.randrange(1 << 30)}"
        if ring.owner(path) == shard_id:
            return path
    raise AssertionError("no path found")


async def wait_until_serving(client: httpx.AsyncClient, path: str, timeout: float = 20) -> None:
    """Until the shard owning `path` answers (anything but 503)."""
    with trio.fail_after(timeout):
        while True:
            try:
                response = await client.head(f"/v1/stream/{path}")
                if response.status_code != 503:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def wait_restarted(supervisor, name: str, old_pid: int, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while supervisor.child_pids().get(name) in (None, old_pid):
            await trio.sleep(0.05)


async def kill_shard(supervisor, client, shard_id: str, probe_path: str) -> None:
    pid = supervisor.child_pids()[shard_id]
    os.kill(pid, signal.SIGKILL)
    await wait_restarted(supervisor, shard_id, pid)
    await wait_until_serving(client, probe_path)


async def read_all(client: httpx.AsyncClient, path: str) -> tuple[bytes, httpx.Response]:
    """Catch-up read from the start, following Stream-Next-Offset until up to date."""
    offset = "-1"
    body = b""
    while True:
        response = await client.get(f"/v1/stream/{path}", params={"offset": offset})
        assert response.status_code == 200, response.text
        body += response.content
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return body, response


async def test_restart_reads_back_byte_exact(start_cluster) -> None:
    async with start_cluster(shards=2) as supervisor:
        ring = owner_map(supervisor)
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client:
            rng = random.Random(7)
            expected: dict[str, bytes] = {}
            for shard_id in ring.shard_ids:
                for n in range(3):
                    path = path_on(ring, shard_id, f"bin{n}")
                    r = await client.put(f"/v1/stream/{path}", headers={"content-type": BINARY})
                    assert r.status_code == 201
                    data = b""
                    for _ in range(20):
                        chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
                        r = await client.post(
                            f"/v1/stream/{path}", content=chunk, headers={"content-type": BINARY}
                        )
                        assert r.status_code == 204, r.text
                        data += chunk
                    expected[path] = data
            json_path = path_on(ring, ring.shard_ids[0], "json")
            await client.put(
                f"/v1/stream/{json_path}", headers={"content-type": "application/json"}
            )
            producer = {"producer-id": "p1", "producer-epoch": "0"}
            for seq in range(5):
                r = await client.post(
                    f"/v1/stream/{json_path}",
                    content=json.dumps([{"n": seq}, {"n": seq, "x": "é"}]),
                    headers={
                        "content-type": "application/json",
                        **producer,
                        "producer-seq": str(seq),
                    },
                )
                assert r.status_code == 200, r.text
            closed_path = path_on(ring, ring.shard_ids[1], "closed")
            await client.put(
                f"/v1/stream/{closed_path}",
                content=b"final",
                headers={"content-type": BINARY, "stream-closed": "true"},
            )

            # Crash every shard, twice in a row: recovery must change nothing.
            for _ in range(2):
                for shard_id in ring.shard_ids:
                    probe = next(p for p in expected if ring.owner(p) == shard_id)
                    await kill_shard(supervisor, client, shard_id, probe)

            for path, data in expected.items():
                body, _ = await read_all(client, path)
                assert body == data, path
            body, _ = await read_all(client, json_path)
            assert json.loads(body) == [m for s in range(5) for m in ({"n": s}, {"n": s, "x": "é"})]
            # Producer state survived: a retry is a duplicate, the next seq is accepted.
            headers = {"content-type": "application/json", **producer}
            r = await client.post(
                f"/v1/stream/{json_path}",
                content=b'{"n": 4}',
                headers={**headers, "producer-seq": "4"},
            )
            assert r.status_code == 204
            r = await client.post(
                f"/v1/stream/{json_path}",
                content=b'{"n": 5}',
                headers={**headers, "producer-seq": "5"},
            )
            assert r.status_code == 200
            body, last = await read_all(client, closed_path)
            assert body == b"final" and last.headers.get("stream-closed") == "true"
            r = await client.post(
                f"/v1/stream/{closed_path}", content=b"more", headers={"content-type": BINARY}
            )
            assert r.status_code == 409


async def test_fork_release_survives_source_shard_outage(start_cluster) -> None:
    """The fork's deletion must reach the source's shard even though it is down (stopped)
    at the time, and even though the fork's shard itself restarts before delivery."""
    async with start_cluster(shards=2) as supervisor:
        ring = owner_map(supervisor)
        src_shard, fork_shard = ring.shard_ids
        source = path_on(ring, src_shard, "src")
        fork = path_on(ring, fork_shard, "fork")
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client:
            await client.put(
                f"/v1/stream/{source}", content=b"hello ", headers={"content-type": BINARY}
            )
            r = await client.put(
                f"/v1/stream/{fork}",
                headers={"stream-forked-from": f"/v1/stream/{source}"},
            )
            assert r.status_code == 201, r.text
            await client.post(
                f"/v1/stream/{fork}", content=b"fork", headers={"content-type": BINARY}
            )
            body, _ = await read_all(client, fork)
            assert body == b"hello fork"

            # Restart the source's shard between the fork's creation and its deletion.
            await kill_shard(supervisor, client, src_shard, source)
            r = await client.delete(f"/v1/stream/{source}")
            assert r.status_code == 204
            assert (await client.head(f"/v1/stream/{source}")).status_code == 410
            body, _ = await read_all(client, fork)
            assert body == b"hello fork"

            # Source's shard unreachable (stopped) while the fork is deleted ...
            src_pid = supervisor.child_pids()[src_shard]
            os.kill(src_pid, signal.SIGSTOP)
            try:
                r = await client.delete(f"/v1/stream/{fork}")
                assert r.status_code == 204
                # ... and the fork's shard crashes before it could deliver the release.
                await kill_shard(supervisor, client, fork_shard, fork)
            finally:
                os.kill(src_pid, signal.SIGCONT)
            # The release is redelivered and the soft-deleted source is collected.
            with trio.fail_after(40):
                while (await client.head(f"/v1/stream/{source}")).status_code != 404:
                    await trio.sleep(0.1)
            # The path is free again.
            r = await client.put(f"/v1/stream/{source}", headers={"content-type": BINARY})
            assert r.status_code == 201


def stream_paths_on_disk(data_dir: Path, scratch: Path) -> set[str]:
    """The stream paths a running shard's database holds, read from a copy of its files
    (the shard keeps the database itself locked against every other process). The copy
    is what a crash at this instant would leave behind: every commit up to now."""
    scratch.mkdir(exist_ok=True)
    for name in ("shard.db", "shard.db-wal"):
        (scratch / name).unlink(missing_ok=True)
        if (data_dir / name).exists():
            shutil.copyfile(data_dir / name, scratch / name)
    conn = sqlite3.connect(scratch / "shard.db")
    try:
        return {row[0] for row in conn.execute("SELECT path FROM streams")}
    finally:
        conn.close()


async def test_expiry_alarm_survives_restart(start_cluster, tmp_path) -> None:
    """A TTL stream disappears from the database with no request touching it, even when
    its shard restarted after the stream was created."""
    async with start_cluster(shards=1) as supervisor:
        shard_id = supervisor.shard_ids[0]
        async with httpx.AsyncClient(base_url=supervisor.url, timeout=10) as client:
            created = time.time()  # the TTL counts from the shard's handling, after this
            r = await client.put(
                "/v1/stream/ttl-stream", headers={"content-type": BINARY, "stream-ttl": "2"}
            )
            assert r.status_code == 201
            await client.put("/v1/stream/keeper", headers={"content-type": BINARY})
            await kill_shard(supervisor, client, shard_id, "keeper")
            data_dir = next(tmp_path.glob(f"cluster-*/data/{shard_id}"))
            with trio.fail_after(15):
                while True:
                    paths = stream_paths_on_disk(data_dir, tmp_path / "copy")
                    if "ttl-stream" not in paths:
                        break
                    await trio.sleep(0.2)
            assert time.time() - created >= 2
            assert "keeper" in paths
            assert (await client.head("/v1/stream/ttl-stream")).status_code == 404
