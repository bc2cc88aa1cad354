"""Prometheus metrics: `GET /metrics` on a real cluster, parsed with prometheus_client.

Real gateway and shard processes under the supervisor, real SQLite, real HTTP; the
exposition is read with `prometheus_client.parser`, as Prometheus would. The pure pieces
(`common.metrics`: the histogram, the wire form of a shard's samples) are unit-tested at
the end.
"""

from __future__ import annotations

import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trustme
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support.cluster import names_on_each_shard

from ds_cluster.common.metrics import (
    BadSamples,
    Histogram,
    build_info,
    from_wire,
    histogram_family,
    merge,
    to_wire,
)
from ds_cluster.gateway.metrics import MAX_SERIES_KEYS, GatewayMetrics, live_label, method_label

BINARY = {"content-type": "application/octet-stream"}
ROUTES = {"/v1/stream/{path}", "/healthz", "/readyz", "/metrics", ""}
SCRAPE_LIMIT = 5.0  # seconds a scrape may take with a shard that does not answer


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str, seconds: float) -> None:
        self.text = text
        self.seconds = seconds
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self) -> Iterator[Sample]:
        for family in self.families.values():
            yield from family.samples

    def value(self, name: str, **labels: str) -> float:
        """The one sample called `name` whose labels include `labels` (0 if none)."""
        found = [
            s.value
            for s in self.samples()
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, f"{name} {labels}: {len(found)} samples"
        return found[0] if found else 0.0

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(
            s.value
            for s in self.samples()
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def shards_of(self, family: str) -> set[str]:
        return {s.labels["shard"] for s in self.families[family].samples if "shard" in s.labels}


async def scrape(client: httpx.AsyncClient) -> Scrape:
    started = time.monotonic()
    response = await client.get("/metrics")
    seconds = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text, seconds)


async def eventually(client: httpx.AsyncClient, check: Any, timeout: float = 30.0) -> Scrape:
    """Scrape until `check(scrape)` holds (a test helper: what it waits for is in other
    processes, so there is no event to wait on)."""
    with trio.fail_after(timeout):
        while True:
            result = await scrape(client)
            if check(result):
                return result
            await trio.sleep(0.1)


async def test_counters_move_by_exactly_the_appends_made(cluster: Any) -> None:
    names = names_on_each_shard(cluster, "metrics")  # shard id -> stream name
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        for name in names.values():
            response = await client.put(f"/v1/stream/{name}", headers=BINARY)
            assert response.status_code == 201
        before = await scrape(client)
        sent: dict[str, tuple[int, int]] = {}
        for i, (shard_id, name) in enumerate(sorted(names.items())):
            count = size = 0
            for k in range(3 + 2 * i):
                body = os.urandom(1 + 37 * k)
                response = await client.post(f"/v1/stream/{name}", content=body, headers=BINARY)
                assert response.status_code in (200, 204), response.text
                count += 1
                size += len(body)
            # An idempotent producer's retry is acknowledged again but appends nothing.
            producer = {**BINARY, "producer-id": "p", "producer-epoch": "0", "producer-seq": "0"}
            for _ in range(2):
                response = await client.post(
                    f"/v1/stream/{name}", content=b"once", headers=producer
                )
                assert response.status_code in (200, 204), response.text
            sent[shard_id] = (count + 1, size + 4)
        read = 0
        for name in names.values():
            response = await client.get(f"/v1/stream/{name}", params={"offset": "-1"})
            assert response.status_code == 200
            read += len(response.content)
        after = await scrape(client)

    shard_ids = set(cluster.shard_ids)
    for shard_id, (count, size) in sent.items():
        label = {"shard": shard_id}
        appends = after.value("ds_appends_total", **label) - before.value(
            "ds_appends_total", **label
        )
        stored = after.value("ds_append_bytes_total", **label) - before.value(
            "ds_append_bytes_total", **label
        )
        assert (appends, stored) == (count, size), shard_id
        assert after.value("ds_streams", **label) == 1
        assert after.value("ds_shard_up", **label) == 1
    assert after.total("ds_read_bytes_total") - before.total("ds_read_bytes_total") == read
    assert read == sum(size for _, size in sent.values())
    # The gateway saw every POST, duplicates included, and labelled it by route template.
    posts = {"http_request_method": "POST", "http_route": "/v1/stream/{path}", "live": "none"}
    answered = after.total("http_server_request_duration_seconds_count", **posts) - before.total(
        "http_server_request_duration_seconds_count", **posts
    )
    assert answered == sum(count + 1 for count, _ in sent.values())
    assert after.value("http_server_active_requests", http_request_method="POST") == 0
    # Every shard's families arrive labelled with it (process CPU and memory included).
    for family in (
        "ds_appends",
        "ds_append_bytes",
        "ds_read_bytes",
        "ds_read_bytes_unsent",
        "ds_streams",
        "ds_commit_batch_size",
        "ds_commit_duration_seconds",
        "ds_loop_stall_seconds",
        "ds_shard_live_reads",
        "ds_build_info",
        "process_cpu_seconds",
        "process_resident_memory_bytes",
    ):
        assert after.shards_of(family) == shard_ids, family
    # The gateway's own, unlabelled by shard.
    for family in (
        "http_server_request_duration_seconds",
        "http_server_active_requests",
        "ds_live_readers",
        "ds_sse_shared_upstreams",
        "ds_body_cache_bytes",
        "ds_body_cache_hits",
        "ds_body_cache_misses",
        "ds_build_info",
        "process_cpu_seconds",
    ):
        assert any("shard" not in s.labels for s in after.families[family].samples), family
    assert after.shards_of("ds_rpc_inflight") == shard_ids  # the gateway's calls, by shard
    assert after.total("ds_commit_batch_size_sum") >= sum(c for c, _ in sent.values())
    # No stream path in any label (cardinality): routes are templates.
    for sample in after.samples():
        for value in sample.labels.values():
            assert not any(name in value for name in names.values()), sample
        if "http_route" in sample.labels:
            assert sample.labels["http_route"] in ROUTES, sample


async def test_stored_streams_are_counted_across_deletes_and_restarts(cluster: Any) -> None:
    victim = "shard-0"
    paths = [names_on_each_shard(cluster, f"counted-{i}")[victim] for i in range(3)]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        for path in paths:
            response = await client.put(f"/v1/stream/{path}", headers=BINARY)
            assert response.status_code == 201
        assert (await client.delete(f"/v1/stream/{paths[0]}")).status_code in (200, 204)
        assert (await scrape(client)).value("ds_streams", shard=victim) == 2
        pid = cluster.child_pids()[victim]
        os.kill(pid, signal.SIGKILL)  # restarted by the supervisor: counted from its database
        with trio.fail_after(30):
            while cluster.child_pids().get(victim) in (None, pid):
                await trio.sleep(0.05)
        restarted = await eventually(client, lambda s: s.value("ds_shard_up", shard=victim) == 1)
        assert restarted.value("ds_streams", shard=victim) == 2
        assert restarted.value("ds_appends_total", shard=victim) == 0  # a new process


async def test_requests_over_http2_are_recorded_too(cluster: Any) -> None:
    """HTTP/2 goes through the ASGI app (not the native route): the same labels."""
    name = "metrics-h2"
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
        httpx.AsyncClient(base_url=cluster.url, timeout=30, http1=False, http2=True) as h2,
    ):
        before = await scrape(client)
        response = await h2.put(f"/v1/stream/{name}", headers=BINARY)
        assert (response.http_version, response.status_code) == ("HTTP/2", 201)
        for _ in range(3):
            response = await h2.post(f"/v1/stream/{name}", content=b"abc", headers=BINARY)
            assert response.status_code in (200, 204)
        assert (await h2.get("/nowhere")).status_code == 404
        after = await scrape(client)
    stream = {"http_route": "/v1/stream/{path}", "live": "none", "url_scheme": "http"}
    name_ = "http_server_request_duration_seconds_count"
    for method, count in (("PUT", 1), ("POST", 3)):
        moved = after.total(name_, http_request_method=method, **stream) - before.total(
            name_, http_request_method=method, **stream
        )
        assert moved == count, method
    assert after.value(name_, http_route="", http_response_status_code="404") == 1
    assert after.total("ds_appends_total") - before.total("ds_appends_total") == 3
    assert after.value("http_server_active_requests", http_request_method="POST") == 0


async def test_requests_over_tls_are_labelled_https(start_cluster: Any, tmp_path: Path) -> None:
    """Under TLS the native route (HTTP/1.1) and HTTP/2 (ALPN) both say url_scheme=https."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with start_cluster(shards=1, tls_cert=cert, tls_key=key) as cluster:
        assert cluster.url.startswith("https://")
        async with (
            httpx.AsyncClient(base_url=cluster.url, timeout=30, verify=trusted) as h1,
            httpx.AsyncClient(base_url=cluster.url, timeout=30, verify=trusted, http2=True) as h2,
        ):
            assert (await h1.put("/v1/stream/tls", headers=BINARY)).status_code == 201
            for client in (h1, h2, h2):
                response = await client.post("/v1/stream/tls", content=b"z", headers=BINARY)
                assert response.status_code in (200, 204)
            assert response.http_version == "HTTP/2"
            after = await scrape(h1)
    posts = {"http_request_method": "POST", "http_route": "/v1/stream/{path}"}
    name = "http_server_request_duration_seconds_count"
    assert after.total(name, url_scheme="https", **posts) == 3
    assert after.total(name, url_scheme="http", **posts) == 0
    assert after.value("ds_appends_total", shard="shard-0") == 3


@pytest.mark.parametrize("cluster", [{"shards": 1, "long_poll_timeout": 60}], indirect=True)
async def test_live_reads_are_counted_while_held(cluster: Any) -> None:
    name = "metrics-live"
    url = f"/v1/stream/{name}"
    async with httpx.AsyncClient(base_url=cluster.url, timeout=90) as client:
        response = await client.put(url, headers=BINARY, content=b"x")
        assert response.status_code == 201
        tail = response.headers["stream-next-offset"]
        long_poll_status: list[int] = []
        async with trio.open_nursery() as nursery:

            async def long_poll() -> None:
                params = {"offset": tail, "live": "long-poll"}
                long_poll_status.append((await client.get(url, params=params)).status_code)

            async def sse(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                params = {"offset": "-1", "live": "sse"}
                async with client.stream("GET", url, params=params) as stream:
                    assert stream.status_code == 200
                    async for _ in stream.aiter_bytes():
                        pass

            nursery.start_soon(long_poll)
            nursery.start_soon(sse)
            held = await eventually(
                client,
                lambda s: (
                    s.value("ds_live_readers", mode="long-poll") == 1
                    and s.value("ds_live_readers", mode="sse") == 1
                    and s.value("ds_shard_live_reads", mode="sse") == 1
                    and s.value("ds_shard_live_reads", mode="long-poll") == 1
                ),
            )
            assert held.value("ds_sse_shared_upstreams") == 1
            assert held.value("http_server_active_requests", http_request_method="GET") >= 2
            assert held.value("ds_rpc_inflight", shard="shard-0") >= 2
            # An append answers the long-poll. A second long-poll and the SSE reader are
            # then left by their client: counted while held, not observed as answered.
            response = await client.post(url, content=b"y", headers=BINARY)
            assert response.status_code in (200, 204)
            tail = response.headers["stream-next-offset"]
            await eventually(client, lambda s: s.value("ds_live_readers", mode="long-poll") == 0)
            assert long_poll_status == [200]
            nursery.start_soon(long_poll)
            await eventually(client, lambda s: s.value("ds_live_readers", mode="long-poll") == 1)
            nursery.cancel_scope.cancel()
        assert long_poll_status == [200]
        after = await eventually(
            client,
            lambda s: (
                s.value("ds_live_readers", mode="long-poll") == 0
                and s.value("ds_live_readers", mode="sse") == 0
                and s.value("ds_sse_shared_upstreams") == 0
                and s.value("ds_shard_live_reads", mode="sse") == 0
                and s.value("ds_shard_live_reads", mode="long-poll") == 0
            ),
        )
    route = {"http_request_method": "GET", "http_route": "/v1/stream/{path}"}
    polls = after.total("http_server_request_duration_seconds_count", live="long-poll", **route)
    streams = after.total("http_server_request_duration_seconds_count", live="sse", **route)
    assert (polls, streams) == (1, 1)
    assert after.value("http_server_active_requests", http_request_method="GET") == 1  # this


@pytest.mark.parametrize("cluster", [{"shards": 2, "restart_initial_delay": 120}], indirect=True)
async def test_a_stopped_or_killed_shard_is_down_and_the_scrape_stays_fast(cluster: Any) -> None:
    victim = "shard-1"
    pid = cluster.child_pids()[victim]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        healthy = await scrape(client)
        assert healthy.value("ds_shard_up", shard=victim) == 1
        os.kill(pid, signal.SIGSTOP)  # alive, connected, answers nothing
        try:
            stopped = await scrape(client)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert stopped.seconds < SCRAPE_LIMIT
        assert stopped.value("ds_shard_up", shard=victim) == 0
        assert stopped.value("ds_shard_up", shard="shard-0") == 1
        assert stopped.shards_of("ds_appends") == {"shard-0"}
        await eventually(client, lambda s: s.value("ds_shard_up", shard=victim) == 1)

        os.kill(pid, signal.SIGKILL)  # not restarted for two minutes
        killed = await eventually(client, lambda s: s.value("ds_shard_up", shard=victim) == 0)
        assert killed.seconds < SCRAPE_LIMIT
        assert killed.value("ds_shard_up", shard="shard-0") == 1
        assert "shard-0" in killed.shards_of("process_cpu_seconds")
        assert victim not in killed.shards_of("process_cpu_seconds")


# ---- the pure pieces ------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert histogram.sum == pytest.approx(2.65)


def _round_trip(families: list[Metric]) -> list[Metric]:
    data = msgpack.unpackb(msgpack.packb(to_wire(families)))
    return from_wire(data, {"shard": "shard-7"})


def test_samples_cross_the_wire_labelled_with_their_shard() -> None:
    histogram = Histogram((1.0,))
    histogram.observe(0.5)
    sent = [histogram_family("x_seconds", "x", ("a",), {("b",): histogram}), build_info()]
    received = _round_trip(sent)
    assert [f.name for f in received] == ["x_seconds", "ds_build_info"]
    for theirs, ours in zip(sent, received, strict=True):
        assert [(s.name, {**s.labels, "shard": "shard-7"}, s.value) for s in theirs.samples] == [
            (s.name, s.labels, s.value) for s in ours.samples
        ]


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"families": []},
        [["x", "counter", "help", ""]],  # four fields
        [["x", "nonsense", "help", "", []]],
        [["", "counter", "help", "", []]],
        [["x", "counter", "help", "", [["x_total", {"a": 1}, 1.0]]]],
        [["x", "counter", "help", "", [["x_total", {}, "1"]]]],
        [["x", "counter", "help", "", [["x_total", {"k" * 300: "v"}, 1.0]]]],
        [["x", "counter", "help", "", [["x_total", {}, 1.0]] * 6000]],
        [["x-y", "counter", "help", "", []]],  # not a metric name
    ],
)
def test_malformed_samples_from_a_shard_are_refused(data: object) -> None:
    with pytest.raises(ValueError):
        from_wire(data, {"shard": "shard-0"})


def test_bad_samples_is_a_value_error() -> None:
    assert issubclass(BadSamples, ValueError)


def test_families_of_one_name_merge_and_mismatched_types_are_dropped() -> None:
    ours = Metric("process_open_fds", "fds", "gauge")
    ours.add_sample("process_open_fds", {}, 5.0)
    theirs = Metric("process_open_fds", "fds", "gauge")
    theirs.add_sample("process_open_fds", {"shard": "shard-0"}, 7.0)
    odd = Metric("process_open_fds", "fds", "counter")
    odd.add_sample("process_open_fds", {"shard": "shard-1"}, 9.0)
    merged = merge([ours, theirs, odd])
    assert len(merged) == 1
    assert [s.value for s in merged[0].samples] == [5.0, 7.0]


def test_label_values_come_from_fixed_sets() -> None:
    assert method_label("POST") == "POST"
    assert method_label("BREW") == "_OTHER"
    assert live_label("GET", b"offset=-1&live=sse") == "sse"
    assert live_label("GET", b"offset=-1&live=long%2Dpoll") == "long-poll"
    assert live_label("GET", b"offset=-1&live=forever") == "none"
    assert live_label("POST", b"live=sse") == "none"


def test_made_up_methods_share_one_series_and_are_remembered_boundedly() -> None:
    recorder = GatewayMetrics.__new__(GatewayMetrics)  # the recorder alone: no pool, no app
    recorder._lookup, recorder.series = {}, {}
    for i in range(MAX_SERIES_KEYS + 500):
        recorder.exchange(f"M{i}", "http", "none").end(405)
    assert list(recorder.series) == [("_OTHER", "http", "none")]
    series = recorder.series[("_OTHER", "http", "none")]
    assert series.active == 0
    assert sum(series.stream[405].counts) == MAX_SERIES_KEYS + 500
    assert len(recorder._lookup) == MAX_SERIES_KEYS
