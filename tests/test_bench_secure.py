"""`ds-cluster bench` against a production-like cluster: https with a test CA, client auth
(every request carries `--header`), and `up --no-metrics` handed down to the gateways.

Tiny counts and sub-second windows: this proves every scenario speaks https and sends the
header (the server refuses any request without it), not that anything is fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from ds_cluster.tools.bench.http import parse_header
from ds_cluster.tools.bench.targets import REPO, free_port

pytestmark = pytest.mark.slow

TOKEN = "bench-" + "b" * 26


class SecureCluster:
    def __init__(self, url: str, cacert: Path) -> None:
        self.url = url
        self.cacert = cacert


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    tmp = tmp_path_factory.mktemp("secure")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cacert, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(cacert))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tokens = tmp / "tokens.json"
    entry = {"name": "bench", "token": TOKEN, "prefixes": [""], "rights": ["read", "write"]}
    tokens.write_text(json.dumps({"tokens": [entry]}))
    port = free_port()
    argv = [sys.executable, "-m", "ds_cluster", "up", "--shards", "1", "--port", str(port)]
    argv += ["--data-dir", str(tmp / "data"), "--log-dir", str(tmp / "logs")]
    argv += ["--tls-cert", str(cert_file), "--tls-key", str(key_file)]
    argv += ["--auth-tokens", str(tokens), "--no-metrics"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=cacert)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"up exited with {proc.returncode}"
            try:
                if httpx.get(f"{url}/readyz", verify=trust, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "cluster not ready in 90 s"
            time.sleep(0.3)
        yield SecureCluster(url, cacert)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench(cluster: SecureCluster, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ds_cluster", "bench", "--url", f"{cluster.url}/v1/stream"]
    cmd += ["--rounds", "1", "--duration", "1", "--processes", "1", "--connections", "4"]
    cmd += ["--streams", "8", "--catchup-streams", "2", "--catchup-size", "131072"]
    cmd += ["--catchup-readers", "2", "--fanout-readers", "10", "--fanout-streams", "2"]
    cmd += ["--fanout-rate", "20", "--idle-connections", "20", "--idle-hold", "0.2"]
    cmd += ["--json", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)


def test_every_scenario_over_https_with_the_header(secure: SecureCluster, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = bench(
        secure,
        out,
        "--scenario",
        "append,json,catchup,longpoll,sse,idle",
        "--cacert",
        str(secure.cacert),
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--append-driver",
        "python",  # wrk's turn is the test below
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = {s: m[0] for s, by in json.loads(out.read_text())["runs"].items() for m in by.values()}
    for scenario in ("append", "json"):
        r = runs[scenario]
        assert r["requests_per_s"] > 0 and r["errors"] == 0 and r["verify_problems"] == 0, r
    assert runs["catchup"]["mb_per_s"] > 0 and runs["catchup"]["errors"] == 0
    for mode in ("longpoll", "sse"):
        r = runs[mode]
        assert r["expected"] == r["delivered"] > 0 and r["lost"] == 0, r
    assert runs["idle"]["held"] == 20, runs["idle"]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_appends_over_https_with_the_header(secure: SecureCluster, tmp_path: Path) -> None:
    """wrk speaks TLS but verifies no certificate: the streams' setup and read-back do."""
    out = tmp_path / "bench.json"
    header = f"Authorization: Bearer {TOKEN}"
    args = ["--scenario", "append", "--cacert", str(secure.cacert), "--header", header]
    proc = bench(secure, out, *args, "--append-driver", "wrk")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (by_target,) = json.loads(out.read_text())["runs"]["append"].values()
    r = by_target[0]
    assert r["append_driver"] == "wrk" and r["requests_per_s"] > 0, r
    assert r["errors"] == 0 and r["verify_problems"] == 0 and r["verified_records"] > 0, r


def test_without_the_header_or_the_ca_it_fails(secure: SecureCluster, tmp_path: Path) -> None:
    """The checks above can fail: no token is refused (401), an unknown CA does not verify."""
    cacert = str(secure.cacert)
    proc = bench(secure, tmp_path / "a.json", "--scenario", "append", "--cacert", cacert)
    assert proc.returncode != 0 and "HTTP 401" in proc.stdout + proc.stderr
    header = f"Authorization: Bearer {TOKEN}"
    proc = bench(secure, tmp_path / "b.json", "--scenario", "append", "--header", header)
    assert proc.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in proc.stdout + proc.stderr


def test_up_no_metrics_reaches_the_gateways(secure: SecureCluster) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    trust = ssl.create_default_context(cafile=secure.cacert)
    r = httpx.get(f"{secure.url}/metrics", headers=auth, verify=trust, timeout=30)
    assert r.status_code == 404 and "--no-metrics" in r.text, r.text


def test_header_arguments_are_parsed_strictly() -> None:
    assert parse_header("Authorization: Bearer x:y ") == ("authorization", "Bearer x:y")
    for bad in ("NoColon", ": empty name", "Bad Name: v", "X-A: a\r\nX-B: b"):
        with pytest.raises(ValueError):
            parse_header(bad)
