"""Faults beyond a kill: the gateway-to-shard link delayed, cut, refused, blackholed
(through `tools.faultproxy`), and a shard whose disk fills up.

Real shard and gateway processes started here directly, so the proxy can sit between
them: the gateway is told the shard lives at the proxy's port. Writers are idempotent
producers that retry the same (epoch, seq) on any 5xx or connection error, so "every
acknowledged write present exactly once, in order" is the invariant throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from support.processes import free_port

from ds_cluster.common.rpc_security import ensure_secret_file
from ds_cluster.tools.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
JSON_TYPE = "application/json"


# ---- the proxy on its own --------------------------------------------------------------


async def _echo_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                async for data in stream:
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(echo, listeners, handler_nursery=nursery)


async def _roundtrip(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        got = b""
        while len(got) < len(data):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            got += chunk
        return got


async def test_faultproxy_forwards_delays_cuts_refuses_and_blackholes() -> None:
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(_echo_server)
        proxy = FaultProxy("127.0.0.1", echo_port)
        port = await nursery.start(proxy.run)

        assert await _roundtrip(port, b"hello") == b"hello"

        proxy.delay = 0.2
        started = trio.current_time()
        assert await _roundtrip(port, b"slow") == b"slow"
        assert trio.current_time() - started >= 0.4  # 0.2 s each way
        proxy.delay = 0.0

        # cut: an open connection is reset; new ones still work
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"x")
        assert await stream.receive_some(10) == b"x"
        proxy.cut()
        with trio.fail_after(2), suppress(trio.BrokenResourceError):  # reset, or EOF
            assert await stream.receive_some(10) == b""
        await trio.aclose_forcefully(stream)
        assert await _roundtrip(port, b"again") == b"again"

        # refuse: connections are reset at once
        proxy.mode = "refuse"
        with trio.fail_after(2):
            with suppress(trio.BrokenResourceError, OSError):
                assert await _roundtrip(port, b"no") == b""

        # blackhole: the connection opens, nothing comes back
        proxy.mode = "blackhole"
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"void")
        with trio.move_on_after(0.5) as scope:
            await stream.receive_some(10)
        assert scope.cancelled_caught
        await trio.aclose_forcefully(stream)

        proxy.heal()
        assert await _roundtrip(port, b"healed") == b"healed"
        nursery.cancel_scope.cancel()


# ---- a shard behind the proxy ----------------------------------------------------------


@dataclass
class ProxiedCluster:
    """One shard and one gateway; the gateway reaches the shard through `proxy`."""

    tmp: Path
    data_dir: Path
    proxy: FaultProxy
    shard_port: int
    url: str
    nursery: trio.Nursery
    shard: trio.Process | None = None
    gateway: trio.Process | None = None
    logs: list[Path] = field(default_factory=list)

    async def _spawn(self, argv: list[str], name: str) -> trio.Process:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as f:
            return await trio.lowlevel.open_process(
                [sys.executable, "-m", "ds_cluster", *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )

    def _secret(self) -> list[str]:
        return ["--cluster-secret-file", str(ensure_secret_file(self.tmp / "cluster.secret"))]

    async def start_shard(self) -> None:
        argv = ["shard", "--id", "shard-0", "--listen", f"127.0.0.1:{self.shard_port}"]
        argv += ["--data-dir", str(self.data_dir), "--long-poll-timeout", "2", *self._secret()]
        self.shard = await self._spawn(argv, "shard")

    async def kill_shard(self) -> None:
        if self.shard is not None and self.shard.returncode is None:
            self.shard.kill()
            await self.shard.wait()

    async def start_gateway(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        argv = ["gateway", "--listen", f"127.0.0.1:{port}"]
        argv += ["--shards", f"shard-0=127.0.0.1:{self.proxy.port}", *self._secret()]
        self.gateway = await self._spawn(argv, "gateway")

    async def wait_ready(self, timeout: float = 30) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            with trio.fail_after(timeout):
                while True:
                    try:
                        if (await client.get(self.url + "/readyz")).status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.1)

    async def stop(self) -> None:
        for proc in (self.gateway, self.shard):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    def print_logs(self) -> None:
        for log in self.logs:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-30:]
                print(f"----- {log.name} -----\n" + "\n".join(tail))


@asynccontextmanager
async def proxied_cluster(tmp: Path, data_dir: Path | None = None) -> AsyncIterator[ProxiedCluster]:
    data_dir = data_dir or tmp / "shard-0"
    data_dir.mkdir(parents=True, exist_ok=True)
    shard_port = free_port()
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy("127.0.0.1", shard_port)
        await nursery.start(proxy.run)
        cluster = ProxiedCluster(
            tmp, data_dir, proxy, shard_port, f"http://127.0.0.1:{free_port()}", nursery
        )
        try:
            await cluster.start_shard()
            await cluster.start_gateway()
            await cluster.wait_ready()
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop()
                cluster.print_logs()
            nursery.cancel_scope.cancel()


class Producer:
    """An idempotent producer that retries the same (epoch, seq) until 200/204."""

    def __init__(self, client: httpx.AsyncClient, url: str, name: str) -> None:
        self.client = client
        self.url = url
        self.name = name
        self.seq = 0
        self.acked: list[str] = []
        self.statuses: list[int | str] = []

    async def append(self, message: str, *, deadline: float = 60) -> float:
        """Append one message; returns how long it took to be acknowledged."""
        started = trio.current_time()
        headers = {
            "content-type": JSON_TYPE,
            "producer-id": self.name,
            "producer-epoch": "0",
            "producer-seq": str(self.seq),
        }
        body = json.dumps([message]).encode()
        with trio.fail_after(deadline):
            while True:
                try:
                    with trio.fail_after(10):
                        response = await self.client.post(self.url, headers=headers, content=body)
                    self.statuses.append(response.status_code)
                    if response.status_code in (200, 204):
                        break
                    assert response.status_code >= 500 or response.status_code == 429, (
                        response.status_code,
                        response.text,
                    )
                except (httpx.TransportError, trio.TooSlowError) as exc:
                    self.statuses.append(type(exc).__name__)
                await trio.sleep(0.05)
        self.seq += 1
        self.acked.append(message)
        return trio.current_time() - started


async def read_all(client: httpx.AsyncClient, url: str, timeout: float = 30) -> list:
    """Catch-up read of a whole JSON stream (retrying while the shard is unavailable)."""
    messages: list = []
    offset = "-1"
    with trio.fail_after(timeout):
        while True:
            try:
                response = await client.get(url, params={"offset": offset})
            except httpx.TransportError:
                await trio.sleep(0.1)
                continue
            if response.status_code >= 500:
                await trio.sleep(0.1)
                continue
            assert response.status_code == 200, (response.status_code, response.text)
            messages += response.json()
            offset = response.headers["stream-next-offset"]
            if response.headers.get("stream-up-to-date") == "true":
                return messages


async def create(client: httpx.AsyncClient, url: str) -> None:
    with trio.fail_after(30):
        while True:
            try:
                response = await client.put(url, headers={"content-type": JSON_TYPE})
                if response.status_code in (200, 201):
                    return
                assert response.status_code >= 500, (response.status_code, response.text)
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)


@pytest.mark.slow
async def test_link_delayed_writes_and_reads_still_succeed(tmp_path: Path) -> None:
    async with proxied_cluster(tmp_path) as cluster, httpx.AsyncClient(timeout=30) as client:
        url = cluster.url + "/v1/stream/delayed"
        await create(client, url)
        producer = Producer(client, url, "p-delay")
        await producer.append("before")
        cluster.proxy.delay = 0.25
        took = await producer.append("during")
        assert took >= 0.5, took  # the delay is on the path, both directions
        # a long-poll waiting through the slow link gets the next write
        async with trio.open_nursery() as nursery:
            got: list = []

            async def long_poll() -> None:
                response = await client.get(url, params={"offset": "now", "live": "long-poll"})
                got.append(response)

            nursery.start_soon(long_poll)
            await trio.sleep(0.6)
            await producer.append("while-waiting")
        assert got[0].status_code == 200 and got[0].json() == ["while-waiting"]
        cluster.proxy.delay = 0.0
        assert await read_all(client, url) == producer.acked


@pytest.mark.slow
async def test_link_cut_loses_nothing_and_gateway_reconnects(tmp_path: Path) -> None:
    async with proxied_cluster(tmp_path) as cluster, httpx.AsyncClient(timeout=30) as client:
        urls = [cluster.url + f"/v1/stream/cut-{i}" for i in range(4)]
        for url in urls:
            await create(client, url)
        producers = [Producer(client, url, f"p-cut-{i}") for i, url in enumerate(urls)]
        stop = trio.Event()

        async def write(producer: Producer) -> None:
            n = 0
            while not stop.is_set():
                await producer.append(f"{producer.name}-{n}")
                n += 1

        async with trio.open_nursery() as nursery:
            for producer in producers:
                nursery.start_soon(write, producer)
            for _ in range(8):  # cut the link repeatedly, mid-traffic
                await trio.sleep(0.4)
                cluster.proxy.cut()
            await trio.sleep(0.5)
            stop.set()
        assert cluster.proxy.cuts == 8
        for producer in producers:
            assert len(producer.acked) > 3
            assert await read_all(client, producer.url) == producer.acked
        # the gateway came back by itself
        assert (await client.get(cluster.url + "/readyz")).status_code == 200
        assert cluster.shard.returncode is None and cluster.gateway.returncode is None


@pytest.mark.slow
async def test_link_refused_fails_fast_with_503_then_recovers(tmp_path: Path) -> None:
    async with proxied_cluster(tmp_path) as cluster, httpx.AsyncClient(timeout=30) as client:
        url = cluster.url + "/v1/stream/refused"
        await create(client, url)
        producer = Producer(client, url, "p-refused")
        await producer.append("a")
        cluster.proxy.mode = "refuse"
        cluster.proxy.cut()
        # A request sent on the link just before the gateway noticed the cut has an unknown
        # outcome (502); once the gateway knows the shard is unreachable it is a sure 503.
        with trio.fail_after(10):
            while (await client.get(cluster.url + "/readyz")).status_code == 200:
                await trio.sleep(0.02)
        for _ in range(5):  # every request while the shard is unreachable: fast 503
            started = time.monotonic()
            response = await client.post(
                url, headers={"content-type": JSON_TYPE}, content=b'["no"]'
            )
            assert response.status_code == 503, response.text
            assert "retry-after" in response.headers
            assert time.monotonic() - started < 3
            response = await client.get(url, params={"offset": "-1"})
            assert response.status_code == 503
        cluster.proxy.heal()
        took = await producer.append("b", deadline=15)  # reconnects with backoff, by itself
        assert took < 10
        assert await read_all(client, url) == ["a", "b"]


@pytest.mark.slow
async def test_link_blackholed_answers_5xx_not_hang(tmp_path: Path) -> None:
    """A shard that accepts but never answers (a hung peer) must not hang the client."""
    async with proxied_cluster(tmp_path) as cluster, httpx.AsyncClient(timeout=60) as client:
        url = cluster.url + "/v1/stream/blackhole"
        await create(client, url)
        producer = Producer(client, url, "p-bh")
        await producer.append("a")
        cluster.proxy.mode = "blackhole"
        started = time.monotonic()
        try:
            with trio.fail_after(40):
                response = await client.post(
                    url,
                    headers={
                        "content-type": JSON_TYPE,
                        "producer-id": "p-bh",
                        "producer-epoch": "0",
                        "producer-seq": "1",
                    },
                    content=b'["b"]',
                )
        except trio.TooSlowError:
            pytest.fail("the gateway held a write to a hung shard for over 40 s without answering")
        assert response.status_code >= 500, response.status_code  # unknown outcome: never 2xx
        print(
            f"blackholed write answered {response.status_code} after "
            f"{time.monotonic() - started:.1f} s"
        )
        cluster.proxy.heal()
        cluster.proxy.cut()  # drop the hung connection so the gateway redials
        producer.seq = 1
        await producer.append("b", deadline=30)  # retry of the same seq: stored once
        assert await read_all(client, url) == ["a", "b"]


# ---- a shard whose disk fills up -------------------------------------------------------


@asynccontextmanager
async def tiny_disk(path: Path, size: str) -> AsyncIterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave: int) -> None:
    """Fill the filesystem under `path` with a file, leaving about `leave` bytes free."""
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.slow
async def test_disk_full_refuses_writes_keeps_acknowledged_and_recovers(tmp_path: Path) -> None:
    async with tiny_disk(tmp_path / "disk", "4m") as disk:
        data_dir = disk / "shard-0"
        async with (
            proxied_cluster(tmp_path, data_dir) as cluster,
            httpx.AsyncClient(timeout=30) as client,
        ):
            url = cluster.url + "/v1/stream/full"
            await create(client, url)
            producer = Producer(client, url, "p-full")
            for n in range(5):
                await producer.append(f"early-{n}")
            fill(disk, leave=256 * 1024)
            # Write big messages until the disk refuses.
            refusals = []
            big = "x" * 32 * 1024
            for n in range(200):
                headers = {
                    "content-type": JSON_TYPE,
                    "producer-id": "p-full",
                    "producer-epoch": "0",
                    "producer-seq": str(producer.seq),
                }
                body = json.dumps([f"big-{n}-{big}"]).encode()
                response = await client.post(url, headers=headers, content=body)
                if response.status_code in (200, 204):
                    producer.seq += 1
                    producer.acked.append(f"big-{n}-{big}")
                    continue
                assert response.status_code in (503, 507), (response.status_code, response.text)
                refusals.append(response.status_code)
                if len(refusals) >= 3:
                    break
            assert refusals, "the disk never filled up"
            print("refusals:", refusals, "acked:", len(producer.acked))
            # Reads still work and everything acknowledged is there.
            assert await read_all(client, url) == producer.acked
            assert cluster.shard.returncode is None, "the shard died of a full disk"
            # Space returns: writes succeed again (the refused batch is retried as is).
            (disk / "filler").unlink()
            await producer.append("after", deadline=30)
            assert await read_all(client, url) == producer.acked
            # And all of it survives a crash.
            await cluster.kill_shard()
            await cluster.start_shard()
            assert await read_all(client, url, timeout=60) == producer.acked
            await producer.append("after-restart", deadline=30)
            assert await read_all(client, url) == producer.acked
    shutil.rmtree(tmp_path / "disk", ignore_errors=True)


# ---- a shard whose database files become unwritable ------------------------------------


def chattr(flag: str, *paths: Path) -> None:
    for path in paths:
        if path.exists():
            subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.mark.slow
async def test_unwritable_database_refuses_writes_keeps_acknowledged_and_recovers(
    tmp_path: Path,
) -> None:
    """`chattr +i` on the live database and WAL: every write to them fails with EPERM, even
    through the shard's open descriptors (root is not exempt, unlike with chmod)."""
    probe = tmp_path / "probe"
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("the filesystem does not support chattr +i")
    chattr("-i", probe)
    data_dir = tmp_path / "shard-0"
    files = [data_dir / "shard.db", data_dir / "shard.db-wal"]
    try:
        async with (
            proxied_cluster(tmp_path, data_dir) as cluster,
            httpx.AsyncClient(timeout=30) as client,
        ):
            url = cluster.url + "/v1/stream/readonly"
            await create(client, url)
            producer = Producer(client, url, "p-ro")
            for n in range(5):
                await producer.append(f"before-{n}")
            chattr("+i", *files)
            statuses = []
            for _ in range(3):
                headers = {
                    "content-type": JSON_TYPE,
                    "producer-id": "p-ro",
                    "producer-epoch": "0",
                    "producer-seq": str(producer.seq),
                }
                response = await client.post(url, headers=headers, content=b'["refused"]')
                statuses.append(response.status_code)
            assert all(s in (503, 507) for s in statuses), statuses
            response = await client.put(
                cluster.url + "/v1/stream/readonly-new", headers={"content-type": JSON_TYPE}
            )
            assert response.status_code in (503, 507), response.status_code
            assert await read_all(client, url) == producer.acked  # reads still served
            assert cluster.shard.returncode is None, "the shard died of an unwritable database"
            chattr("-i", *files)
            await producer.append("after", deadline=30)  # same seq as the refused ones
            assert await read_all(client, url) == producer.acked
            await cluster.kill_shard()
            await cluster.start_shard()
            assert await read_all(client, url, timeout=60) == producer.acked
    finally:
        chattr("-i", *files)
