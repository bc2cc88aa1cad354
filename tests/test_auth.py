"""Client authentication and authorization on real gateways (docs/auth.md).

A cluster under the supervisor with a tokens file and an Ed25519 JWT key: every operation
without a token, with a wrong one, an expired JWT, a token for another prefix and a
read-only token on writes, and nothing changes; reloads on change and on SIGHUP; live
reads refused before they join a shared upstream; a gateway in front of a scripted shard
shows that the Authorization header never reaches a shard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from durable_streams import DurableStream
from support.auth import secret_args
from support.cluster import running_cluster
from support.fakeshard import FakeShard, Reply, ThreadedShard
from support.processes import REPO_ROOT, gateway_for

from ds_cluster.supervisor.cluster import Supervisor

pytestmark = pytest.mark.slow

WRITER = "writer-" + "w" * 24  # orders/: read, write, admin
READER = "reader-" + "r" * 24  # orders/: read
OTHER = "other-" + "o" * 24  # logs/: everything
METRICS = "metrics-" + "m" * 24  # metrics only
LATER = "later-" + "l" * 24  # added by a reload
REALM = 'Bearer realm="ds-cluster"'
LONG = 60.0  # long-poll timeout and SSE duration: far longer than any test waits


def token(name: str, value: str, prefixes: list[str], rights: list[str]) -> dict[str, Any]:
    return {"name": name, "token": value, "prefixes": prefixes, "rights": rights}


BASE_TOKENS = [
    token("writer", WRITER, ["orders/"], ["read", "write", "admin"]),
    token("reader", READER, ["orders/"], ["read"]),
    token("other", OTHER, ["logs/"], ["read", "write", "admin"]),
    token("metrics", METRICS, [], ["metrics"]),
]


def write_tokens(path: Path, tokens: list[dict[str, Any]]) -> None:
    """Replace the file in one rename, as a config management tool would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tokens": tokens}))
    os.replace(tmp, path)


class Keys:
    def __init__(self, tmp: Path) -> None:
        self.private = ed25519.Ed25519PrivateKey.generate()
        self.public_file = tmp / "jwt.pem"
        self.public_file.write_bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.tokens_file = tmp / "tokens.json"
        write_tokens(self.tokens_file, BASE_TOKENS)

    def jwt(self, *, exp: float, prefixes: list[str], rights: list[str]) -> str:
        claims = {"sub": "test", "exp": int(exp), "ds_prefixes": prefixes, "ds_rights": rights}
        return jwt.encode(claims, self.private, algorithm="EdDSA")


def bearer(value: str | None) -> dict[str, str]:
    return {} if value is None else {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
async def authed(tmp_path: Path, keys: Keys) -> AsyncIterator[Supervisor]:
    async with running_cluster(
        tmp_path,
        shards=2,
        auth_tokens=keys.tokens_file,
        auth_jwt_key=keys.public_file,
        auth_metrics=True,
        long_poll_timeout=LONG,
        sse_max_duration=LONG,
    ) as supervisor:
        yield supervisor


def operations(source: str) -> list[tuple[str, str, str, dict[str, str], bytes, bool]]:
    """(name, method, path, headers, body, writes) of every kind of request on `source`."""
    fresh = f"orders/new-{uuid4().hex[:8]}"
    plain = {"Content-Type": "text/plain"}
    return [
        ("create", "PUT", fresh, plain, b"", True),
        ("append", "POST", source, plain, b"intruder", True),
        ("close", "POST", source, {**plain, "Stream-Closed": "true"}, b"", True),
        ("read", "GET", f"{source}?offset=-1", {}, b"", False),
        ("head", "HEAD", source, {}, b"", False),
        ("long-poll", "GET", f"{source}?offset=-1&live=long-poll", {}, b"", False),
        ("sse", "GET", f"{source}?offset=-1&live=sse", {}, b"", False),
        ("delete", "DELETE", source, {}, b"", True),
        ("fork", "PUT", fresh, {**plain, "Stream-Forked-From": f"/v1/stream/{source}"}, b"", True),
    ]


async def test_every_operation_refused_and_nothing_changes(authed: Supervisor, keys: Keys) -> None:
    base = f"{authed.url}/v1/stream"
    source = f"orders/src-{uuid4().hex[:8]}"
    expired = keys.jwt(exp=time.time() - 60, prefixes=[""], rights=["read", "write", "admin"])
    cases = [
        ("no token", None, 401, REALM),
        ("wrong token", "w" * 32, 401, f'{REALM}, error="invalid_token"'),
        ("expired JWT", expired, 401, f'{REALM}, error="invalid_token"'),
        ("other prefix", OTHER, 403, f'{REALM}, error="insufficient_scope"'),
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.put(
            f"{base}/{source}", headers={**bearer(WRITER), "Content-Type": "text/plain"}
        )
        assert r.status_code == 201, r.text
        r = await client.post(
            f"{base}/{source}",
            headers={**bearer(WRITER), "Content-Type": "text/plain"},
            content=b"kept",
        )
        assert r.status_code in (200, 204), r.text
        ops = operations(source)
        refused = 0
        for label, credential, status, challenge in cases:
            for name, method, path, headers, body, _ in ops:
                r = await client.request(
                    method,
                    f"{base}/{path}",
                    headers={**headers, **bearer(credential)},
                    content=body,
                )
                assert r.status_code == status, (label, name, r.status_code, r.text)
                assert r.headers["www-authenticate"] == challenge, (label, name)
                assert r.headers["content-type"].startswith("text/plain"), (label, name)
                assert r.headers["cache-control"] == "no-store"
                if method != "HEAD":
                    assert r.text.endswith("\n") and len(r.text) < 200, (label, name, r.text)
                refused += 1
        for name, method, path, headers, body, writes in ops:  # read-only token on writes
            if writes:
                r = await client.request(
                    method, f"{base}/{path}", headers={**headers, **bearer(READER)}, content=body
                )
                assert r.status_code == 403, (name, r.status_code, r.text)
                refused += 1
        assert refused == 4 * 9 + 5
        # Nothing changed: the stream holds what the writer put there, open; no fork exists.
        r = await client.get(f"{base}/{source}?offset=-1", headers=bearer(READER))
        assert r.status_code == 200 and r.content == b"kept", r.text
        assert "stream-closed" not in {k.lower() for k in r.headers}
        r = await client.get(f"{base}/{ops[0][2]}?offset=-1", headers=bearer(READER))
        assert r.status_code == 404
        # The same operations with the right tokens go through.
        valid = keys.jwt(exp=time.time() + 600, prefixes=["orders/"], rights=["read"])
        for credential in (READER, valid):
            for name, method, path, headers, body, writes in ops:
                if writes or name == "sse":
                    continue
                r = await client.request(
                    method,
                    f"{base}/{path}",
                    headers={**headers, **bearer(credential)},
                    content=body,
                )
                assert r.status_code == 200, (name, r.status_code, r.text)


async def test_stream_paths_shaped_like_subscription_routes_need_a_token(
    authed: Supervisor,
) -> None:
    """Only the reserved `__ds/subscriptions/<id>/{callback,ack,release}` POSTs carry their
    own credentials; a stream whose path merely looks like one needs a client token."""
    base = f"{authed.url}/v1/stream"
    plain = {"Content-Type": "text/plain"}
    async with httpx.AsyncClient(timeout=30) as client:
        for action in ("callback", "ack", "release"):
            path = f"orders/subscriptions/{uuid4().hex[:8]}/{action}"
            r = await client.put(f"{base}/{path}", headers=plain)
            assert r.status_code == 401, (path, r.status_code, r.text)
            r = await client.post(f"{base}/{path}", headers=plain, content=b"sneaky")
            assert r.status_code == 401, (path, r.status_code, r.text)
            r = await client.get(f"{base}/{path}?offset=-1", headers=bearer(READER))
            assert r.status_code == 404, (path, r.status_code, r.text)


async def test_right_tokens_do_everything(authed: Supervisor, keys: Keys) -> None:
    base = f"{authed.url}/v1/stream"
    source = f"orders/all-{uuid4().hex[:8]}"
    fork = f"orders/fork-{uuid4().hex[:8]}"
    plain = {"Content-Type": "text/plain"}
    jwt_writer = keys.jwt(exp=time.time() + 600, prefixes=["orders/"], rights=["write"])
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.put(f"{base}/{source}", headers={**plain, **bearer(jwt_writer)})
        assert r.status_code == 201, r.text
        r = await client.post(f"{base}/{source}", headers={**plain, **bearer(WRITER)}, content=b"a")
        assert r.status_code in (200, 204), r.text
        # A fork needs admin here and read on the source: the writer token has both...
        r = await client.put(
            f"{base}/{fork}",
            headers={**plain, **bearer(WRITER), "Stream-Forked-From": f"/v1/stream/{source}"},
        )
        assert r.status_code == 201, r.text
        # ...a token with admin on logs/ but no read on the source does not.
        r = await client.put(
            f"{base}/logs/fork-{uuid4().hex[:8]}",
            headers={**plain, **bearer(OTHER), "Stream-Forked-From": f"/v1/stream/{source}"},
        )
        assert r.status_code == 403 and f"read on {source}" in r.text, r.text
        r = await client.get(f"{base}/{fork}?offset=-1", headers=bearer(READER))
        assert r.status_code == 200 and r.content == b"a"
        r = await client.delete(f"{base}/{fork}", headers=bearer(WRITER))
        assert r.status_code in (200, 204), r.text


async def test_http2_and_the_asgi_path_decide_alike(authed: Supervisor) -> None:
    """HTTP/2 (prior knowledge) and percent-encoded live queries go through ASGI, not the
    native route: the same decisions there."""
    base = f"{authed.url}/v1/stream"
    name = f"orders/h2-{uuid4().hex[:8]}"
    plain = {"Content-Type": "text/plain"}
    async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as h2:
        r = await h2.put(f"{base}/{name}", headers=plain)
        assert r.http_version == "HTTP/2" and r.status_code == 401, r.text
        r = await h2.put(f"{base}/{name}", headers={**plain, **bearer(READER)})
        assert r.status_code == 403, r.text
        r = await h2.put(f"{base}/{name}", headers={**plain, **bearer(WRITER)})
        assert r.status_code == 201, r.text
        r = await h2.post(f"{base}/{name}", headers={**plain, **bearer(OTHER)}, content=b"no")
        assert r.status_code == 403, r.text
        r = await h2.get(f"{base}/{name}?offset=-1&live=sse")
        assert r.status_code == 401 and r.headers["www-authenticate"] == REALM
    async with httpx.AsyncClient(timeout=30) as h1:
        for query in ("offset=-1&live=%73se", "offset=-1&live=long%2Dpoll"):
            r = await h1.get(f"{base}/{name}?{query}")
            assert r.status_code == 401, (query, r.text)


async def test_health_metrics_and_preflight(authed: Supervisor) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{authed.url}/healthz")).status_code == 200
        assert (await client.get(f"{authed.url}/readyz")).status_code == 200
        r = await client.get(f"{authed.url}/metrics")
        assert r.status_code == 401 and r.headers["www-authenticate"] == REALM
        r = await client.get(f"{authed.url}/metrics", headers=bearer(WRITER))
        assert r.status_code == 403
        r = await client.get(f"{authed.url}/metrics", headers=bearer(METRICS))
        assert r.status_code not in (401, 403)
        # A browser's preflight carries no token: answered, and Authorization allowed.
        r = await client.options(
            f"{authed.url}/v1/stream/orders/x",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert r.status_code == 204
        assert "authorization" in r.headers["access-control-allow-headers"].split(", ")
        r = await client.get(f"{authed.url}/v1/stream/orders/x")
        assert "www-authenticate" in r.headers["access-control-expose-headers"].lower()


async def test_live_reads_refused_before_joining(authed: Supervisor) -> None:
    """A refused reader gets its 401 at once, while an identical authorized long-poll and
    SSE read are still waiting on their shared upstreams (had it joined one, it would have
    had to wait with them), and never sees their data."""
    base = f"{authed.url}/v1/stream"
    name = f"orders/live-{uuid4().hex[:8]}"
    plain = {"Content-Type": "text/plain"}
    async with httpx.AsyncClient(timeout=LONG) as client:
        r = await client.put(f"{base}/{name}", headers={**plain, **bearer(WRITER)})
        assert r.status_code == 201
        tail = r.headers["stream-next-offset"]
        poll_url = f"{base}/{name}?offset={tail}&live=long-poll"
        sse_url = f"{base}/{name}?offset={tail}&live=sse"
        poll_done = trio.Event()
        sse_started = trio.Event()
        got: dict[str, Any] = {}

        async def long_poll() -> None:
            got["poll"] = await client.get(poll_url, headers=bearer(READER))
            poll_done.set()

        async def sse() -> None:
            async with client.stream("GET", sse_url, headers=bearer(READER)) as response:
                got["sse_status"] = response.status_code
                sse_started.set()
                async for chunk in response.aiter_text():
                    if "news" in chunk:
                        got["sse"] = chunk
                        return

        with trio.fail_after(LONG / 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                nursery.start_soon(sse)
                await sse_started.wait()
                assert got["sse_status"] == 200
                for url in (poll_url, sse_url):
                    for credential in (None, OTHER):
                        r = await client.get(url, headers=bearer(credential))
                        assert r.status_code in (401, 403), r.text
                        assert "news" not in r.text
                assert not poll_done.is_set(), "the authorized long-poll ended early"
                r = await client.post(
                    f"{base}/{name}", headers={**plain, **bearer(WRITER)}, content=b"news"
                )
                assert r.status_code in (200, 204)
        assert got["poll"].status_code == 200 and got["poll"].content == b"news"
        assert "news" in got["sse"]


async def test_refused_before_the_body_is_sent(authed: Supervisor) -> None:
    """A refused client's body is not waited for: the answer comes after the head alone
    (without the early answer, the gateway would wait for the body, then answer 408)."""
    host, port = authed.url.removeprefix("http://").rsplit(":", 1)
    heads = [
        b"content-length: 1000000\r\n",
        b"transfer-encoding: chunked\r\n",
    ]
    for framing in heads:
        for credential, status in (
            (b"", b"401"),
            (f"authorization: Bearer {READER}\r\n".encode(), b"403"),
        ):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(
                    b"POST /v1/stream/orders/big HTTP/1.1\r\nhost: x\r\n"
                    b"content-type: text/plain\r\n" + framing + credential + b"\r\n"
                )
                with trio.fail_after(30):
                    head = b""
                    while b"\r\n\r\n" not in head:
                        data = await stream.receive_some(4096)
                        assert data, head
                        head += data
            assert head.startswith(b"HTTP/1.1 " + status), head


async def wait_for_line(log_file: Path, text: str, after: int, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while text not in log_file.read_text(errors="replace")[after:]:
            await trio.sleep(0.1)


async def test_reload_on_change_and_on_sighup(tmp_path: Path, keys: Keys) -> None:
    async with running_cluster(tmp_path, shards=1, auth_tokens=keys.tokens_file) as cluster:
        url = f"{cluster.url}/v1/stream/orders/r-{uuid4().hex[:8]}"
        log_file = tmp_path / "logs" / "gateway-0.log"
        async with httpx.AsyncClient(timeout=30) as client:

            async def status(credential: str) -> int:
                return (await client.head(url, headers=bearer(credential))).status_code

            r = await client.put(url, headers={**bearer(WRITER), "Content-Type": "text/plain"})
            assert r.status_code == 201
            assert await status(LATER) == 401
            # Changed on disk: picked up by a later request (the file is looked at once a
            # second, read in a thread), with no signal.
            write_tokens(keys.tokens_file, [*BASE_TOKENS, token("later", LATER, [""], ["read"])])
            with trio.fail_after(30):
                while await status(LATER) != 200:
                    await trio.sleep(0.2)
            # An invalid file: logged, and the tokens in use stay.
            mark = len(log_file.read_text(errors="replace"))
            keys.tokens_file.write_text('{"tokens": [{"name": "broken"}]}')
            await trio.sleep(1.2)
            assert await status(READER) == 200
            await wait_for_line(log_file, "not reloaded", mark)
            assert await status(LATER) == 200
            # SIGHUP: the new file is read with no request at all in between.
            write_tokens(keys.tokens_file, [token("reader", READER, ["orders/"], ["read"])])
            mark = len(log_file.read_text(errors="replace"))
            os.kill(cluster.child_pids()["gateway-0"], signal.SIGHUP)
            await wait_for_line(log_file, "auth files reloaded", mark)
            assert await status(LATER) == 401
            assert await status(READER) == 200


def test_invalid_files_stop_the_gateway_at_start(tmp_path: Path) -> None:
    bad_tokens = tmp_path / "tokens.json"
    bad_tokens.write_text(
        '{"tokens": [{"name": "a", "token": "short", "prefixes": [], "rights": []}]}'
    )
    short_secret = tmp_path / "secret"
    short_secret.write_text("too short\n")
    for option, path, problem in (
        ("--auth-tokens", bad_tokens, "shorter than 16"),
        ("--auth-tokens", tmp_path / "missing.json", "No such file"),
        ("--auth-jwt-key", short_secret, "at least 32 bytes"),
    ):
        argv = [sys.executable, "-m", "ds_cluster", "gateway", "--listen", "127.0.0.1:0"]
        argv += ["--shards", "s1=127.0.0.1:9", *secret_args(tmp_path), option, str(path)]
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert option in done.stderr and problem in done.stderr, done.stderr


def test_up_refuses_a_missing_auth_file(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "ds_cluster", "up", "--port", "0"]
    argv += ["--data-dir", str(tmp_path / "data"), "--auth-tokens", str(tmp_path / "none.json")]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--auth-tokens" in done.stderr and "not a readable file" in done.stderr


SEEN: list[dict[str, Any]] = []


async def recording(msg: dict[str, Any], reply: Reply) -> None:
    SEEN.append(msg)
    if msg["op"] == "http":
        await reply({"k": "res", "i": msg["i"], "s": 204, "h": [], "b": b"", "more": False})
    else:  # a reserved route's op: a plain result
        result = {"s": 204, "h": [], "b": b""}
        await reply({"k": "res", "i": msg["i"], "a": result, "more": False})


def test_authorization_header_never_reaches_a_shard(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    write_tokens(tokens_file, [*BASE_TOKENS, token("subs", LATER, ["__ds/"], ["write"])])
    shard = ThreadedShard(FakeShard("s1", recording))
    shard.start()
    try:
        with gateway_for(shard, "--auth-tokens", str(tokens_file)) as gw:
            SEEN.clear()
            for method in ("GET", "POST", "PUT"):
                r = httpx.request(
                    method,
                    f"{gw.url}/v1/stream/orders/seen",
                    headers={**bearer(WRITER), "Content-Type": "text/plain"},
                )
                assert r.status_code == 204, r.text
            # A reserved route a client token opens: the token stays at the gateway too.
            r = httpx.put(f"{gw.url}/v1/stream/__ds/subscriptions/s1", headers=bearer(LATER))
            assert r.status_code == 204, r.text
            assert len(SEEN) == 4
            for msg in SEEN:
                assert WRITER not in repr(msg) and LATER not in repr(msg), msg
                if msg["op"] == "http":
                    assert all(name.lower() != "authorization" for name, _ in msg["h"]), msg
            # A refused request never reaches the shard.
            for credential in (None, READER, "x" * 20):
                r = httpx.post(f"{gw.url}/v1/stream/orders/seen", headers=bearer(credential))
                assert r.status_code in (401, 403)
            assert len(SEEN) == 4
    finally:
        shard.stop()


async def test_python_client_with_a_token(authed: Supervisor) -> None:
    url = f"{authed.url}/v1/stream/orders/py-{uuid4().hex[:8]}"

    def scenario() -> None:
        headers = {"Authorization": f"Bearer {WRITER}"}
        with DurableStream.create(url, content_type="application/json", headers=headers) as s:
            s.append({"n": 1})
            with s.stream(live=False) as res:
                assert res.read_json() == [{"n": 1}]
        with pytest.raises(Exception) as refused:
            DurableStream.create(url + "-x", content_type="application/json")
        assert "401" in str(refused.value) or "nauthori" in str(refused.value)

    await trio.to_thread.run_sync(scenario)
