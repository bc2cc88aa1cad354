"""Structured logs (`--log-format json`) and request ids, on real processes.

- Every line a gateway, shard or supervisor logs is one JSON object with a timestamp
  (RFC 3339, UTC), level, logger, message, the process's role, id and pid.
- Every response carries X-Request-Id: the client's when usable, else a generated one;
  the access log line of the request carries the same id, the method, route template,
  path, status, duration and bytes in and out.
- The access log keeps the native route (it says which path served each request).
The formatters and request-id rules are also unit-tested here (pure code).
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from support.cluster import running_cluster
from support.logs import access_line, json_lines
from support.up import up_until_ready

from ds_cluster.common import logs
from ds_cluster.gateway import access
from ds_cluster.supervisor.cluster import Supervisor

TEXT = "text/plain"
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
GENERATED_ID = re.compile(r"[0-9a-f]{16}")
IDENTITY = ("ts", "level", "logger", "msg", "role", "id", "pid")

# ---- pure code ------------------------------------------------------------------------


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("some.logger", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_writes_one_object_per_line_with_identity_and_extras() -> None:
    line = logs.JsonFormatter("shard", "shard-3").format(_record(request_id="r1", status=204))
    assert "\n" not in line
    data = json.loads(line)
    assert RFC3339_UTC.fullmatch(data["ts"]), data["ts"]
    assert data["level"] == "WARNING" and data["logger"] == "some.logger"
    assert data["msg"] == "a b"
    assert (data["role"], data["id"], data["pid"]) == ("shard", "shard-3", data["pid"])
    assert isinstance(data["pid"], int)
    assert data["request_id"] == "r1" and data["status"] == 204


def test_json_formatter_keeps_a_traceback_on_its_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = logs.JsonFormatter("gateway", "127.0.0.1:1").format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_an_extra_field_cannot_overwrite_the_identity() -> None:
    data = json.loads(logs.JsonFormatter("shard", "shard-0").format(_record(role="x", ts="y")))
    assert data["role"] == "shard" and data["ts"] != "y"


def test_text_formatter() -> None:
    text = logs.TextFormatter("shard-1").format(_record(request_id="r2"))
    assert re.fullmatch(r"\S+Z shard-1 WARNING some\.logger: a b request_id=r2", text), text


def test_setup_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    try:
        logs.setup("gateway", "h:1", level="debug", log_format="json", stream=out)
        logs.setup("gateway", "h:1", level="debug", log_format="json", stream=out)
        logging.getLogger("t").debug("once")
        assert [json.loads(x)["msg"] for x in out.getvalue().splitlines()] == ["once"]
        with pytest.raises(ValueError):
            logs.setup("gateway", "h:1", log_format="xml", stream=out)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_line_writer_writes_what_the_formatter_would() -> None:
    """The access log's fast writer: the same fields, format and stream as `setup`."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for log_format in logs.FORMATS:
            out = io.StringIO()
            logs.setup("gateway", "h:1", log_format=log_format, stream=out)
            logs.LineWriter("access").write('GET /a"b 200', {"status": 200, "path": '/a"b'})
            logging.getLogger("access").info('GET /a"b 200', extra={"status": 200, "path": '/a"b'})
            fast, slow = out.getvalue().splitlines()
            if log_format == "json":
                fast_line, slow_line = json.loads(fast), json.loads(slow)
                assert fast_line.pop("ts") and slow_line.pop("ts")
                assert fast_line == slow_line
                assert fast_line["path"] == '/a"b' and fast_line["role"] == "gateway"
            else:
                assert fast.split(" ", 1)[1] == slow.split(" ", 1)[1].replace(
                    'path=/a"b status=200', 'status=200 path=/a"b'
                )
            logging.getLogger("access").setLevel(logging.WARNING)
            logs.LineWriter("access").write("not written", {})
            logging.getLogger("access").setLevel(logging.NOTSET)
            assert "not written" not in out.getvalue()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (b"abc-123", True),
        (b"x" * 128, True),
        (b"!~", True),
        (b"x" * 129, False),
        (b"", False),
        (b"has space", False),
        (b"caf\xc3\xa9", False),
        (b"tab\there", False),
    ],
)
def test_request_id_rules(given: bytes, kept: bool) -> None:
    rid = access.request_id([(b"host", b"x"), (b"x-request-id", given)])
    if kept:
        assert rid == given
    else:
        assert GENERATED_ID.fullmatch(rid.decode()), rid
    assert access.request_id([]) != access.request_id([])
    noted = access.given_or_new(given)  # what the native route uses: the same rules
    assert noted == given if kept else GENERATED_ID.fullmatch(noted.decode()), noted
    assert GENERATED_ID.fullmatch(access.given_or_new(None).decode())


def test_route_templates_are_a_bounded_set() -> None:
    assert access.route_template("/v1/stream/orders/1") == "/v1/stream/{path}"
    assert access.route_template("/readyz") == "/readyz"
    assert access.route_template("/anything/else") == "other"


# ---- real processes ---------------------------------------------------------------------


def _url(cluster: Supervisor, name: str) -> str:
    return f"{cluster.url}/v1/stream/logs-{name}-{uuid.uuid4().hex[:8]}"


async def test_every_process_logs_json_lines_with_its_identity(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, shards=2, log_format="json") as cluster:
        pids = cluster.child_pids()
        async with httpx.AsyncClient() as client:
            await client.put(_url(cluster, "id"), headers={"content-type": TEXT})
    listen = cluster.url.removeprefix("http://")
    for name, ident in (("shard-0", "shard-0"), ("shard-1", "shard-1"), ("gateway-0", listen)):
        path = tmp_path / "logs" / f"{name}.log"
        raw = [x for x in path.read_text().splitlines() if x.startswith("{")]
        lines = json_lines(path)
        assert lines and len(lines) == len(raw), name
        for line in lines:
            assert all(key in line for key in IDENTITY), line
            assert RFC3339_UTC.fullmatch(line["ts"]), line
            role = name.split("-")[0]
            assert (line["role"], line["id"]) == (role, ident), line
        assert pids[name] in {line["pid"] for line in lines}


async def test_request_ids_round_trip_into_the_access_log(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, shards=1, log_format="json", access_log=True) as cluster:
        log_dir = tmp_path / "logs"
        url = _url(cluster, "rid")
        async with httpx.AsyncClient() as client:
            created = await client.put(url, headers={"content-type": TEXT})
            generated = created.headers["x-request-id"]
            assert GENERATED_ID.fullmatch(generated)
            line = await access_line(log_dir, generated)
            assert line["method"] == "PUT" and line["status"] == 201

            given = "client-chosen.id:1"
            appended = await client.post(
                url, content=b"12345", headers={"content-type": TEXT, "x-request-id": given}
            )
            assert appended.headers["x-request-id"] == given
            line = await access_line(log_dir, given)
            path = url.removeprefix(cluster.url)
            assert line["msg"] == f"POST {path} 204"
            assert line["method"] == "POST" and line["path"] == path
            assert line["route"] == "/v1/stream/{path}"
            assert line["status"] == 204 and line["via"] == "native"
            assert line["bytes_in"] == 5 and line["bytes_out"] == 0
            assert 0 <= line["duration_s"] < 30
            assert line["role"] == "gateway" and line["level"] == "INFO"

            read = await client.get(url, params={"offset": "-1"})
            line = await access_line(log_dir, read.headers["x-request-id"])
            assert line["bytes_out"] == 5 and line["status"] == 200

            unusable = "x" * 129
            refused = await client.get(url, headers={"x-request-id": unusable})
            assert GENERATED_ID.fullmatch(refused.headers["x-request-id"])

            health = await client.get(f"{cluster.url}/healthz", headers={"x-request-id": "hz"})
            assert health.headers["x-request-id"] == "hz"
            line = await access_line(log_dir, "hz")
            assert line["route"] == "/healthz" and line["via"] == "asgi"
            missing = await client.get(f"{cluster.url}/nope", headers={"x-request-id": "nf"})
            assert missing.status_code == 404
            assert (await access_line(log_dir, "nf"))["route"] == "other"


async def test_access_log_keeps_the_native_route(tmp_path: Path) -> None:
    """HTTP/1.1 stream requests stay native with the access log on; HTTP/2 (prior
    knowledge) goes through ASGI; a native SSE read is logged when it ends."""
    async with running_cluster(tmp_path, shards=1, log_format="json", access_log=True) as cluster:
        log_dir = tmp_path / "logs"
        url = _url(cluster, "native")
        async with httpx.AsyncClient() as client:
            await client.put(url, headers={"content-type": TEXT})
            for n in range(3):
                rid = f"native-{n}"
                await client.post(
                    url, content=b"x", headers={"content-type": TEXT, "x-request-id": rid}
                )
                assert (await access_line(log_dir, rid))["via"] == "native"
            headers = {"x-request-id": "native-sse"}
            params = {"offset": "-1", "live": "sse"}
            async with client.stream("GET", url, params=params, headers=headers) as res:
                assert res.headers["x-request-id"] == "native-sse"
                async for chunk in res.aiter_bytes():
                    if b"upToDate" in chunk:
                        break
        line = await access_line(log_dir, "native-sse")
        assert line["via"] == "native" and line["status"] == 200 and line["bytes_out"] > 0

        async with httpx.AsyncClient(http1=False, http2=True) as h2:
            read = await h2.get(url, params={"offset": "-1"}, headers={"x-request-id": "via-h2"})
            assert read.http_version == "HTTP/2" and read.text == "xxx"
            assert read.headers["x-request-id"] == "via-h2"
        line = await access_line(log_dir, "via-h2")
        assert line["via"] == "asgi" and line["bytes_out"] == 3


async def test_without_the_access_log_ids_are_still_returned(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=1, log_format="json") as cluster,
        httpx.AsyncClient() as client,
    ):
        res = await client.put(_url(cluster, "off"), headers={"x-request-id": "off-1"})
        assert res.headers["x-request-id"] == "off-1"
    lines = json_lines(tmp_path / "logs" / "gateway-0.log")
    assert not [x for x in lines if x["logger"] == "access"]


async def test_up_logs_json_for_the_supervisor_too(tmp_path: Path) -> None:
    """`ds-cluster up --log-format json`: the supervisor's own lines are JSON as well."""
    options = ["--shards", "1", "--port", "0", "--data-dir", str(tmp_path / "data")]
    options += ["--log-format", "json", "--log-dir", str(tmp_path / "logs")]
    async with up_until_ready(*options) as up:
        received = up.stderr
    lines = [json.loads(x) for x in received.decode().splitlines() if x.startswith("{")]
    ready = [x for x in lines if "cluster ready" in x["msg"]]
    assert ready and ready[0]["role"] == "supervisor" and ready[0]["id"] == "supervisor"
    assert all(key in ready[0] for key in IDENTITY)
