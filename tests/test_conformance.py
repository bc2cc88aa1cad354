"""The official Durable Streams conformance suite against a real cluster, 1 and 4 shards.

The suite (npm `@durable-streams/server-conformance-tests`, pinned in conformance/) runs
under vitest in a Node process; the cluster runs under the supervisor here. The shards'
long-poll timeout is shortened to 2 s because some suite tests wait at most 5 s for a
long-poll to end. Needs `npm ci` in conformance/ (`make test` does it). One run has
client auth on (docs/auth.md): the suite sends a token that covers every stream
(DS_AUTH_TOKEN), after a check that a request without it is refused. One runs over
https (1 shard; a test CA from `trustme`, which Node trusts through NODE_EXTRA_CA_CERTS).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from support.cluster import SUMMARY_PROPERTY, running_cluster

CONFORMANCE_DIR = Path(__file__).resolve().parent.parent / "conformance"
VITEST = CONFORMANCE_DIR / "node_modules" / "vitest" / "vitest.mjs"
LONG_POLL_TIMEOUT_S = 2
SUITE_TESTS = 338  # the suite's count with its opt-in subscription tests (DS_SUBSCRIPTIONS)
SUITE_DEADLINE_S = 900


def summarize(report: dict) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Counts by status, and failed test names grouped by their top-level describe."""
    counts: dict[str, int] = defaultdict(int)
    failures: dict[str, list[str]] = defaultdict(list)
    for file_result in report["testResults"]:
        for test in file_result["assertionResults"]:
            counts[test["status"]] += 1
            if test["status"] == "failed":
                group = " > ".join(test["ancestorTitles"]) or "(top level)"
                message = (test.get("failureMessages") or [""])[0].splitlines()
                failures[group].append(f"{test['title']}: {message[0] if message else ''}")
    return dict(counts), dict(failures)


def _https_files(tmp_path: Path) -> dict[str, Path]:
    """A test CA (tmp_path/ca.pem) and the gateway's certificate and key from it."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return {"tls_cert": cert, "tls_key": key}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shards", "auth", "tls"),
    [(1, False, False), (4, False, False), (2, True, False), (1, False, True)],
    ids=["1", "4", "2-auth", "1-https"],
)
async def test_conformance_suite(
    tmp_path: Path,
    shards: int,
    auth: bool,
    tls: bool,
    record_property: Callable[[str, object], None],
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (the conformance suite runs under Node)")
    if not VITEST.exists():
        pytest.fail(f"{VITEST} missing: run `npm ci` in {CONFORMANCE_DIR} (make test does)")
    report_path = tmp_path / "vitest-report.json"
    options: dict[str, Any] = {}
    token_env: dict[str, str] = {}
    if auth:
        token = secrets.token_urlsafe(32)
        tokens_file = tmp_path / "tokens.json"
        entry = {
            "name": "suite",
            "token": token,
            "prefixes": [""],
            "rights": ["read", "write", "admin"],
        }
        tokens_file.write_text(json.dumps({"tokens": [entry]}))
        options["auth_tokens"] = tokens_file
        token_env["DS_AUTH_TOKEN"] = token
    if tls:
        options.update(_https_files(tmp_path))
        token_env["NODE_EXTRA_CA_CERTS"] = str(tmp_path / "ca.pem")
    async with running_cluster(
        tmp_path, shards=shards, long_poll_timeout=LONG_POLL_TIMEOUT_S, **options
    ) as supervisor:
        if auth:  # the suite runs against a server that refuses requests without the token
            async with httpx.AsyncClient() as client:
                refused = await client.get(f"{supervisor.url}/v1/stream/any?offset=-1")
            assert refused.status_code == 401, refused.text
        env = {
            **os.environ,
            **token_env,
            "DS_BASE_URL": supervisor.url,
            "DS_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_TIMEOUT_S * 1000),
            "DS_SUBSCRIPTIONS": "1",
        }
        started = trio.current_time()
        with trio.fail_after(SUITE_DEADLINE_S):
            result = await trio.run_process(
                [node, str(VITEST), "run", "--reporter=json", f"--outputFile={report_path}"],
                cwd=CONFORMANCE_DIR,
                env=env,
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
        elapsed = trio.current_time() - started
        restarts = list(supervisor.restarts)
    if not report_path.exists():
        print(result.stdout.decode(errors="replace")[-5000:])
        print(result.stderr.decode(errors="replace")[-5000:])
        pytest.fail(f"vitest wrote no report (exit code {result.returncode})")
    counts, failures = summarize(json.loads(report_path.read_text()))
    passed, failed = counts.get("passed", 0), counts.get("failed", 0)
    skipped = sum(n for status, n in counts.items() if status not in ("passed", "failed"))
    line = (
        f"conformance, {shards} shard(s){', auth on' if auth else ''}"
        f"{', over https' if tls else ''}, {elapsed:.0f} s: "
        f"{passed} passed, {failed} failed, {skipped} skipped"
    )
    # The run's summary travels with the test's report (from an xdist worker too) and is
    # printed at the end of the session (conftest's `pytest_terminal_summary`).
    record_property(SUMMARY_PROPERTY, line)
    for group, names in sorted(failures.items()):
        record_property(SUMMARY_PROPERTY, f"  {group}: {len(names)} failed")
        for name in names:
            record_property(SUMMARY_PROPERTY, f"    - {name}"[:200])
    print(line)
    assert not restarts, f"children died during the suite: {restarts}"
    assert failed == 0, f"{failed} conformance tests failed: {json.dumps(failures, indent=1)}"
    assert passed >= SUITE_TESTS, f"only {passed} of {SUITE_TESTS} conformance tests passed"
    assert result.returncode == 0, f"vitest exited with {result.returncode}"
