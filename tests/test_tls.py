"""HTTPS on the gateway (`--tls-cert/--tls-key`), against real clusters with a test CA.

- The official Python client (`durable-streams`) and httpx over https://, HTTP/1.1 and
  HTTP/2 chosen by ALPN; health and readiness reachable.
- Appends, reads, long-polls and SSE reads over TLS on HTTP/1.1 take the native route
  (the access log says which path served a request).
- SIGHUP reloads the certificate: a new connection sees the new one, an open one goes on;
  a bad new certificate is refused and the previous one keeps serving.
- A client that opens a connection and never completes the handshake costs only that
  connection.
The conformance suite over https is in tests/test_conformance.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from durable_streams import AsyncDurableStream, DurableStream, astream, stream
from support.cluster import running_cluster
from support.logs import access_line, wait_for_line
from support.up import up_until_ready

from ds_cluster.gateway.tls import HANDSHAKE_TIMEOUT
from ds_cluster.supervisor.cluster import ClusterConfig, Supervisor

TEXT = "text/plain"


@dataclass
class Pki:
    """A test CA and the gateway's certificate files (rewritten by `issue`)."""

    ca: trustme.CA
    cert: Path
    key: Path

    def issue(self, ca: trustme.CA | None = None) -> trustme.LeafCert:
        leaf = (ca or self.ca).issue_cert("127.0.0.1", "localhost")
        self.key.write_bytes(leaf.private_key_pem.bytes())
        self.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        return leaf

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(trustme.CA(), tmp_path / "cert.pem", tmp_path / "key.pem")
    pki.issue()
    return pki


@pytest.fixture
async def tls_cluster(tmp_path: Path, pki: Pki) -> AsyncIterator[Supervisor]:
    async with running_cluster(
        tmp_path,
        shards=2,
        tls_cert=pki.cert,
        tls_key=pki.key,
        access_log=True,
        log_format="json",
        long_poll_timeout=5,
    ) as supervisor:
        yield supervisor


def _url(cluster: Supervisor, name: str) -> str:
    return f"{cluster.url}/v1/stream/tls-{name}-{uuid.uuid4().hex[:8]}"


def _address(cluster: Supervisor) -> tuple[str, int]:
    host, port = cluster.url.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


async def test_the_cluster_serves_https_and_health_stays_reachable(
    tls_cluster: Supervisor, pki: Pki
) -> None:
    assert tls_cluster.url.startswith("https://")
    async with httpx.AsyncClient(verify=pki.client_context()) as client:
        assert (await client.get(f"{tls_cluster.url}/healthz")).status_code == 200
        assert (await client.get(f"{tls_cluster.url}/readyz")).json() == {"ready": True}
    async with httpx.AsyncClient() as untrusting:  # the system CAs do not know ours
        with pytest.raises(httpx.ConnectError):
            await untrusting.get(f"{tls_cluster.url}/healthz")


async def test_official_python_client_over_https(tls_cluster: Supervisor, pki: Pki) -> None:
    url = _url(tls_cluster, "client")
    context = pki.client_context()

    def scenario() -> None:
        with (
            httpx.Client(verify=context) as client,
            DurableStream.create(url, content_type="application/json", client=client) as h,
        ):
            first = h.append({"n": 1})
            h.append({"n": 2})
            with h.stream(live=False) as res:
                assert res.read_json() == [{"n": 1}, {"n": 2}]
            with stream(url, offset=first.next_offset, live=False, client=client) as res:
                assert res.read_json() == [{"n": 2}]

    await trio.to_thread.run_sync(scenario)

    # The asynchronous client, tailing with SSE while another handle appends.
    async with httpx.AsyncClient(verify=context) as client:
        received: list[dict] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def writer() -> None:
                    async with AsyncDurableStream(
                        url, content_type="application/json", batching=False, client=client
                    ) as h:
                        for n in (3, 4):
                            await trio.sleep(0.3)
                            await h.append({"n": n})

                nursery.start_soon(writer)
                async with astream(url, offset="-1", live="sse", client=client) as res:
                    async for item in res.iter_json():
                        received.append(item)
                        if len(received) == 4:
                            break
    assert received == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
async def test_httpx_over_https_with_alpn(tls_cluster: Supervisor, pki: Pki, http2: bool) -> None:
    """ALPN picks HTTP/2 when the client offers it, HTTP/1.1 otherwise; both serve the
    whole protocol."""
    url = _url(tls_cluster, "alpn")
    version = "HTTP/2" if http2 else "HTTP/1.1"
    async with httpx.AsyncClient(verify=pki.client_context(), http2=http2) as client:
        created = await client.put(url, headers={"content-type": TEXT})
        assert created.status_code == 201, created.text
        assert created.http_version == version
        assert created.headers["location"].startswith("https://")
        for n in range(3):
            appended = await client.post(url, content=f"<{n}>", headers={"content-type": TEXT})
            assert appended.status_code == 204, appended.text
        read = await client.get(url, params={"offset": "-1"})
        assert read.status_code == 200 and read.text == "<0><1><2>"
        assert read.http_version == version


async def test_native_route_serves_appends_and_long_polls_under_tls(
    tls_cluster: Supervisor, pki: Pki
) -> None:
    """The access log names the path that served each request: over TLS on HTTP/1.1,
    appends, reads and long-polls stay on the native route; HTTP/2 goes through ASGI."""
    log_dir = Path(tls_cluster.config.log_dir or "")
    url = _url(tls_cluster, "native")
    async with httpx.AsyncClient(verify=pki.client_context(), timeout=30) as client:
        await client.put(url, headers={"content-type": TEXT})
        appended = await client.post(
            url, content="hello", headers={"content-type": TEXT, "x-request-id": "tls-append-1"}
        )
        assert appended.status_code == 204
        assert appended.headers["x-request-id"] == "tls-append-1"
        line = await access_line(log_dir, "tls-append-1")
        assert line["via"] == "native" and line["status"] == 204 and line["bytes_in"] == 5

        # A long-poll parked on the native route, woken by an append.
        tail = appended.headers["stream-next-offset"]
        polled: list[httpx.Response] = []

        async def poll() -> None:
            polled.append(
                await client.get(
                    url,
                    params={"offset": tail, "live": "long-poll"},
                    headers={"x-request-id": "tls-poll-1"},
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.5)  # let it park first (an earlier append would answer it too)
            async with httpx.AsyncClient(verify=pki.client_context()) as writer:
                await writer.post(url, content="world", headers={"content-type": TEXT})
        assert polled[0].status_code == 200 and polled[0].text == "world"
        line = await access_line(log_dir, "tls-poll-1")
        assert line["via"] == "native" and line["status"] == 200

    async with httpx.AsyncClient(verify=pki.client_context(), http2=True) as client:
        read = await client.get(url, params={"offset": "-1"}, headers={"x-request-id": "tls-h2"})
        assert read.text == "helloworld"
    assert (await access_line(log_dir, "tls-h2"))["via"] == "asgi"


async def test_native_sse_under_tls(tls_cluster: Supervisor, pki: Pki) -> None:
    """SSE over TLS on HTTP/1.1 is written by the native SSE client (through the TLS
    stream, in order): the replay, then frames appended while it reads, to two readers
    sharing one upstream."""
    log_dir = Path(tls_cluster.config.log_dir or "")
    url = _url(tls_cluster, "sse")
    context = pki.client_context()
    async with httpx.AsyncClient(verify=context, timeout=30) as client:
        await client.put(url, headers={"content-type": TEXT})
        await client.post(url, content="a" * 70_000, headers={"content-type": TEXT})

    async def read(rid: str, seen: list[bytes]) -> None:
        params = {"offset": "-1", "live": "sse"}
        async with (
            httpx.AsyncClient(verify=context, timeout=30) as client,
            client.stream("GET", url, params=params, headers={"x-request-id": rid}) as res,
        ):
            assert res.status_code == 200 and res.http_version == "HTTP/1.1"
            async for chunk in res.aiter_bytes():
                seen.append(chunk)
                if b"<end>" in b"".join(seen):
                    return

    got: dict[str, list[bytes]] = {"tls-sse-1": [], "tls-sse-2": []}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for rid, seen in got.items():
                nursery.start_soon(read, rid, seen)
            await trio.sleep(1)
            async with httpx.AsyncClient(verify=context) as writer:
                for n in range(5):
                    body = f"<{n}>" if n < 4 else "<end>"
                    await writer.post(url, content=body, headers={"content-type": TEXT})
    for rid, seen in got.items():
        text = b"".join(seen).decode()
        data = "".join(
            line[5:] for line in text.splitlines() if line.startswith("data:") and "{" not in line
        )
        assert data == "a" * 70_000 + "<0><1><2><3><end>", (rid, text[-300:])
        line = await access_line(log_dir, rid)
        assert line["via"] == "native" and line["bytes_out"] >= 70_000, line


async def test_long_poll_client_leaving_under_tls(tls_cluster: Supervisor, pki: Pki) -> None:
    """A native long-poll over TLS notices its client leaving (the gateway reads the TLS
    stream while it waits): logged as 499, not answered by the shard's 204 at the
    long-poll timeout. A request pipelined behind a long-poll is kept, and served once
    the long-poll is answered."""
    log_dir = Path(tls_cluster.config.log_dir or "")
    url = _url(tls_cluster, "leave")
    async with httpx.AsyncClient(verify=pki.client_context()) as client:
        created = await client.put(url, headers={"content-type": TEXT})
        tail = created.headers["stream-next-offset"]
    host, port = _address(tls_cluster)
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, pki.client_context(), server_hostname=host)
    path = url.split(str(port), 1)[1]
    poll = f"GET {path}?offset={tail}&live=long-poll HTTP/1.1\r\nHost: {host}\r\n"
    await tls.send_all(f"{poll}X-Request-Id: tls-gone-1\r\n\r\n".encode())
    await trio.sleep(0.5)
    await tls.aclose()
    line = await access_line(log_dir, "tls-gone-1")
    assert line["status"] == 499 and line["via"] == "native", line

    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, pki.client_context(), server_hostname=host)
    request = f"GET {path}?offset={tail}&live=long-poll HTTP/1.1\r\nHost: {host}\r\n\r\n"
    second = f"GET {path}?offset=-1 HTTP/1.1\r\nHost: {host}\r\n\r\n"
    await tls.send_all(request.encode())
    await trio.sleep(0.5)
    await tls.send_all(second.encode())
    async with httpx.AsyncClient(verify=pki.client_context()) as client:
        await client.post(url, content="x", headers={"content-type": TEXT})
    received = b""
    with trio.fail_after(20):
        while received.count(b"HTTP/1.1 200") < 2:
            data = await tls.receive_some()
            assert data, received
            received += data
    await tls.aclose()


async def _peer_serial(cluster: Supervisor, pki: Pki) -> int:
    """The serial number of the certificate a new connection is shown."""
    host, port = _address(cluster)
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, pki.client_context(), server_hostname=host)
    try:
        await tls.do_handshake()
        cert = tls.getpeercert()
    finally:
        await tls.aclose()
    assert cert is not None
    return int(str(cert["serialNumber"]), 16)


def _serial(leaf: trustme.LeafCert) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


async def _wait_for_serial(cluster: Supervisor, pki: Pki, serial: int) -> None:
    with trio.fail_after(20):
        while await _peer_serial(cluster, pki) != serial:
            await trio.sleep(0.1)


async def test_sighup_reloads_the_certificate(tmp_path: Path, pki: Pki) -> None:
    first = pki.issue()
    async with running_cluster(
        tmp_path, shards=1, tls_cert=pki.cert, tls_key=pki.key, log_format="json"
    ) as cluster:
        assert await _peer_serial(cluster, pki) == _serial(first)
        gateway = cluster.child_pids()["gateway-0"]
        async with httpx.AsyncClient(verify=pki.client_context()) as kept:
            assert (await kept.get(f"{cluster.url}/healthz")).status_code == 200

            second = pki.issue()
            os.kill(gateway, signal.SIGHUP)
            await _wait_for_serial(cluster, pki, _serial(second))
            # The connection opened before the reload goes on, with its old session.
            assert (await kept.get(f"{cluster.url}/healthz")).status_code == 200

        # A bad new certificate: logged, and the previous one keeps serving.
        pki.cert.write_text("not a certificate\n")
        os.kill(gateway, signal.SIGHUP)
        log = Path(cluster.config.log_dir or "") / "gateway-0.log"
        line = await wait_for_line(log, lambda x: "not reloaded" in x.get("msg", ""))
        assert line["level"] == "ERROR" and line["logger"] == "gateway.tls"
        assert await _peer_serial(cluster, pki) == _serial(second)
        assert cluster.child_pids()["gateway-0"] == gateway  # it did not die or restart

        # Another CA's certificate: the client (trusting ours only) now refuses it.
        pki.issue(trustme.CA())
        os.kill(gateway, signal.SIGHUP)
        with trio.fail_after(20):
            while True:
                try:
                    await _peer_serial(cluster, pki)
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.1)


async def test_a_client_that_never_handshakes_costs_only_its_connection(
    tls_cluster: Supervisor, pki: Pki
) -> None:
    """Silent and garbage-sending connections do not stop others; the silent one is
    closed after the handshake timeout."""
    host, port = _address(tls_cluster)
    silent = await trio.open_tcp_stream(host, port)
    garbage = await trio.open_tcp_stream(host, port)
    await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP on the TLS port
    with trio.fail_after(10):  # an alert perhaps, then closed
        with contextlib.suppress(trio.BrokenResourceError):
            while await garbage.receive_some():
                pass
    async with httpx.AsyncClient(verify=pki.client_context()) as client:
        assert (await client.get(f"{tls_cluster.url}/healthz")).status_code == 200
    with trio.fail_after(HANDSHAKE_TIMEOUT + 10):
        while await silent.receive_some():
            pass


def test_up_refuses_a_certificate_that_does_not_load(tmp_path: Path, pki: Pki) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "other-key.pem"
    wrong_key.write_bytes(other.private_key_pem.bytes())
    for cert, key in ((pki.cert, wrong_key), (tmp_path / "missing.pem", pki.key)):
        with pytest.raises(ValueError, match="--tls-cert"):
            ClusterConfig(data_dir=tmp_path / "data", tls_cert=cert, tls_key=key)
    with pytest.raises(ValueError, match="go together"):
        ClusterConfig(data_dir=tmp_path / "data", tls_cert=pki.cert)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def test_sighup_to_up_reloads_every_gateway(tmp_path: Path, pki: Pki) -> None:
    """`ds-cluster up` passes SIGHUP on to its gateways (and survives it itself)."""
    options = ["--shards", "1", "--gateways", "2", "--port", "0"]
    options += ["--data-dir", str(tmp_path / "data"), "--log-format", "json"]
    options += ["--log-dir", str(tmp_path / "logs"), "--tls-cert", str(pki.cert)]
    options += ["--tls-key", str(pki.key)]
    async with up_until_ready(*options) as up:
        gateways = ("gateway-0", "gateway-1")
        with trio.fail_after(60):  # `up` is ready once one of them answers
            for gateway in gateways:
                while "listening on" not in _text(tmp_path / "logs" / f"{gateway}.log"):
                    await trio.sleep(0.1)
        up.process.send_signal(signal.SIGHUP)
        for gateway in gateways:
            log = tmp_path / "logs" / f"{gateway}.log"
            await wait_for_line(log, lambda x: x.get("msg", "").startswith("certificate reloaded"))
            assert _text(log).count("listening on") == 1  # not restarted
        assert up.process.returncode is None
