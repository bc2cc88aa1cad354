"""Subscriptions across shards, end to end: real shard and gateway processes, real SQLite,
a real webhook receiver on 127.0.0.1 (the spec's localhost development exception).

What the conformance suite does not cover: a pattern matching streams on every shard, a
stream's shard killed between an append and its notice (the wake still comes, once per
generation), a webhook receiver that is down for a while (retries, persisted across a
restart of the subscription's owner, then delivery), and a stale generation's callback.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from support.cluster import names_on_each_shard, running_cluster
from support.http import parse_head

from ds_cluster.common.ring import Ring

pytestmark = pytest.mark.slow

JSON = {"content-type": "application/json"}
DEADLINE = 60  # seconds for anything that crosses shards on a loaded machine


def ring_of(cluster: Any) -> Ring:
    return Ring(1, tuple(cluster.shard_ids))


def sub_owner(cluster: Any, sub_id: str) -> str:
    return ring_of(cluster).owner(f"__ds/subscriptions/{sub_id}")


async def eventually(check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Await `check()` until it returns something truthy (polling an HTTP API)."""
    with trio.fail_after(timeout):
        while True:
            result = await check()
            if result:
                return result
            await trio.sleep(0.05)


async def create_stream(client: httpx.AsyncClient, path: str, body: bytes = b"") -> str:
    r = await client.put(f"/v1/stream/{path}", content=body, headers=JSON)
    assert r.status_code == 201, r.text
    return r.headers["stream-next-offset"]


async def append(client: httpx.AsyncClient, path: str, event: dict[str, Any]) -> str:
    r = await client.post(f"/v1/stream/{path}", content=json.dumps(event), headers=JSON)
    assert r.status_code in (200, 204), r.text
    return r.headers["stream-next-offset"]


async def tail_of(client: httpx.AsyncClient, path: str) -> str:
    r = await client.head(f"/v1/stream/{path}")
    assert r.status_code == 200, r.text
    return r.headers["stream-next-offset"]


async def create_sub(client: httpx.AsyncClient, sub_id: str, config: dict[str, Any]) -> Any:
    r = await client.put(f"/v1/stream/__ds/subscriptions/{sub_id}", json=config)
    assert r.status_code == 201, r.text
    return r.json()


async def get_sub(client: httpx.AsyncClient, sub_id: str) -> Any:
    r = await client.get(f"/v1/stream/__ds/subscriptions/{sub_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def wake_events(client: httpx.AsyncClient, wake_stream: str, sub_id: str) -> list[Any]:
    r = await client.get(f"/v1/stream/{wake_stream}", params={"offset": "-1"})
    if r.status_code == 503:  # its shard is restarting: nothing seen yet
        return []
    assert r.status_code == 200, r.text
    return [e for e in r.json() if e.get("subscription_id") == sub_id]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver: records each request (headers, raw body) and answers with
    `reply()`'s JSON. One request per connection (it answers `connection: close`)."""

    def __init__(self, port: int, reply: dict[str, Any] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.reply = json.dumps(reply or {}).encode()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                _, headers, body = parse_head(data)
                length = int(headers.get("content-length", "0"))
                while len(body) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    body += chunk
                self.requests.append((headers, body))
                self.arrived.set()
                self.arrived = trio.Event()
                out = self.reply
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(out), out)
                )

    async def wait_for(self, count: int, timeout: float = DEADLINE) -> list[Any]:
        with trio.fail_after(timeout):
            while len(self.requests) < count:
                await self.arrived.wait()
        return [json.loads(body) for _headers, body in self.requests]


def verify(jwks: dict[str, Any], headers: dict[str, str], body: bytes) -> bool:
    """The receiver's side of section 7.1: Ed25519 over `<t>.<raw body>`, key by kid."""
    fields = dict(part.split("=", 1) for part in headers["webhook-signature"].split(","))
    key = next(k for k in jwks["keys"] if k["kid"] == fields["kid"])
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key["x"] + "=="))
    signature = base64.urlsafe_b64decode(fields["ed25519"] + "==")
    public.verify(signature, fields["t"].encode() + b"." + body)  # raises if forged
    return True


async def kill(cluster: Any, shard_id: str) -> None:
    pid = cluster.child_pids()[shard_id]
    os.kill(pid, signal.SIGKILL)
    with trio.fail_after(DEADLINE):
        while cluster.child_pids().get(shard_id) in (None, pid):
            await trio.sleep(0.05)


async def test_a_pattern_matches_streams_on_every_shard(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=4) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
    ):
        ring = ring_of(cluster)
        before = names_on_each_shard(cluster, "fan/old")  # exist before the subscription
        for path in before.values():
            await create_stream(client, path, b'[{"n": 0}]')
        await create_stream(client, "wake/fan", b"[]")
        await create_sub(
            client, "fan", {"type": "pull-wake", "pattern": "fan/*", "wake_stream": "wake/fan"}
        )
        # Backfill: every shard's matching streams, linked at their tail (nothing pending).
        linked = {s["path"]: s for s in (await get_sub(client, "fan"))["streams"]}
        assert set(linked) == set(before.values())
        for path in before.values():
            assert linked[path]["link_type"] == "glob"
            assert linked[path]["acked_offset"] == await tail_of(client, path)

        fresh = names_on_each_shard(cluster, "fan/new")
        assert {ring.owner(p) for p in fresh.values()} == set(cluster.shard_ids)
        tails = {path: await create_stream(client, path, b'[{"n": 1}]') for path in fresh.values()}
        await append(client, before[cluster.shard_ids[0]], {"n": 2})
        tails[before[cluster.shard_ids[0]]] = await tail_of(client, before[cluster.shard_ids[0]])

        await eventually(lambda: wake_events(client, "wake/fan", "fan"))

        async def all_pending() -> Any:
            r = await client.post("/v1/stream/__ds/subscriptions/fan/claim", json={"worker": "w1"})
            assert r.status_code == 200, r.text
            claimed = r.json()
            pending = {s["path"]: s["tail_offset"] for s in claimed["streams"] if s["has_pending"]}
            if pending == tails:
                return claimed
            release = {"wake_id": claimed["wake_id"], "generation": claimed["generation"]}
            auth = {"authorization": f"Bearer {claimed['token']}"}
            r = await client.post(
                "/v1/stream/__ds/subscriptions/fan/release", json=release, headers=auth
            )
            assert r.status_code == 204, r.text
            return None

        claimed = await eventually(all_pending)
        ack = {
            "wake_id": claimed["wake_id"],
            "generation": claimed["generation"],
            "acks": [{"stream": p, "offset": o} for p, o in tails.items()],
            "done": True,
        }
        auth = {"authorization": f"Bearer {claimed['token']}"}
        r = await client.post("/v1/stream/__ds/subscriptions/fan/ack", json=ack, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "next_wake": False}
        acked = {s["path"]: s["acked_offset"] for s in (await get_sub(client, "fan"))["streams"]}
        for path, offset in tails.items():
            assert acked[path] == offset


async def test_a_notice_survives_its_shard_being_killed(tmp_path: Path) -> None:
    """The stream's shard commits an append while the subscription's owner cannot be
    reached, and is SIGKILLed before it could tell it: the notice row committed with the
    append is delivered by the restarted shard, and the wake event is written once."""
    async with (
        running_cluster(tmp_path, shards=4) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
    ):
        ring = ring_of(cluster)
        owner = sub_owner(cluster, "killed")
        stream = next(p for s, p in names_on_each_shard(cluster, "kill/s").items() if s != owner)
        stream_shard = ring.owner(stream)
        wakes = names_on_each_shard(cluster, "wake/k")
        wake = next(p for s, p in wakes.items() if s not in (owner, stream_shard))
        await create_stream(client, wake, b"[]")
        config = {"type": "pull-wake", "pattern": "kill/*", "wake_stream": wake}
        await create_sub(client, "killed", config)

        owner_pid = cluster.child_pids()[owner]
        os.kill(owner_pid, signal.SIGSTOP)
        try:
            # Until the owner is known unreachable (the gateway's view; the shards' links
            # drop on the same ping timeout), so the notice cannot reach its socket.
            async def owner_unready() -> bool:
                r = await client.get("/readyz")
                return r.status_code == 503 and owner in r.text

            await eventually(owner_unready)
            await trio.sleep(2)
            tail = await create_stream(client, stream, b'[{"n": 1}]')
            await trio.sleep(0.5)
            await kill(cluster, stream_shard)
        finally:
            os.kill(owner_pid, signal.SIGCONT)

        events = await eventually(lambda: wake_events(client, wake, "killed"))
        assert events[0]["stream"] == stream

        async def claim() -> Any:  # the gateway may still be reconnecting to the owner
            r = await client.post(
                "/v1/stream/__ds/subscriptions/killed/claim", json={"worker": "w"}
            )
            assert r.status_code in (200, 503), r.text
            return r.json() if r.status_code == 200 else None

        claimed = await eventually(claim)
        info = next(s for s in claimed["streams"] if s["path"] == stream)
        assert info["has_pending"] and info["tail_offset"] == tail
        await trio.sleep(1)  # a repeated notice or append would show up by now
        generations = [e["generation"] for e in await wake_events(client, wake, "killed")]
        assert len(generations) == len(set(generations)), generations  # once per generation
        assert generations == [claimed["generation"]]


async def test_a_webhook_receiver_down_for_a_while(tmp_path: Path) -> None:
    """Delivery fails while nothing listens (status `failed`, retries with backoff), the
    owner is killed meanwhile (the retry schedule is in its database), then the
    receiver comes up and gets the wake, signed, once; `{done: true}` acks it."""
    port = free_port()
    async with (
        running_cluster(tmp_path, shards=2) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
        trio.open_nursery() as nursery,
    ):
        receiver = Receiver(port, reply={"done": True})
        created = await create_sub(
            client,
            "down",
            {"type": "webhook", "pattern": "down/*", "webhook": {"url": receiver.url}},
        )
        tail = await create_stream(client, "down/a", b'[{"n": 1}]')

        async def failed() -> bool:
            return (await get_sub(client, "down"))["status"] == "failed"

        await eventually(failed)
        await kill(cluster, sub_owner(cluster, "down"))

        async def answers() -> Any:
            try:
                r = await client.get("/v1/stream/__ds/subscriptions/down")
            except httpx.TransportError:
                return None
            return r.json() if r.status_code == 200 else None

        assert (await eventually(answers))["status"] == "failed"  # persisted
        await nursery.start(receiver.serve)
        bodies = await receiver.wait_for(1)
        jwks = (await client.get(created["webhook"]["signing"]["jwks_url"])).json()
        headers, raw = receiver.requests[0]
        assert verify(jwks, headers, raw)
        assert bodies[0]["subscription_id"] == "down"
        assert bodies[0]["generation"] == 1  # the same wake, retried

        async def acked() -> bool:
            body = await get_sub(client, "down")
            return body["status"] == "active" and body["streams"][0]["acked_offset"] == tail

        await eventually(acked)
        await trio.sleep(1)
        assert len(receiver.requests) == 1
        nursery.cancel_scope.cancel()


async def test_a_stale_generations_callback_is_refused(tmp_path: Path) -> None:
    async with (
        running_cluster(tmp_path, shards=2) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as client,
        trio.open_nursery() as nursery,
    ):
        receiver = Receiver(free_port())  # answers {}: the worker calls back later
        await nursery.start(receiver.serve)
        config = {"type": "webhook", "pattern": "stale/*", "webhook": {"url": receiver.url}}
        await create_sub(client, "stale", config)
        tail1 = await create_stream(client, "stale/a", b'[{"n": 1}]')
        first = (await receiver.wait_for(1))[0]
        assert first["generation"] == 1

        async def callback(token: str, body: dict[str, Any]) -> httpx.Response:
            auth = {"authorization": f"Bearer {token}"}
            return await client.post(first["callback_url"], json=body, headers=auth)

        done1 = {
            "wake_id": first["wake_id"],
            "generation": 1,
            "acks": [{"stream": "stale/a", "offset": tail1}],
            "done": True,
        }
        r = await callback(first["callback_token"], done1)
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "next_wake": False}

        tail2 = await append(client, "stale/a", {"n": 2})
        second = (await receiver.wait_for(2))[1]
        assert second["generation"] == 2 and second["wake_id"] != first["wake_id"]
        done2 = {**done1, "acks": [{"stream": "stale/a", "offset": tail2}]}
        current = {"wake_id": second["wake_id"], "generation": 2}
        for token, body in [
            (first["callback_token"], done2 | {"wake_id": first["wake_id"], "generation": 1}),
            (first["callback_token"], done2 | current),  # the token is generation 1's
            (second["callback_token"], done2 | {"wake_id": first["wake_id"]}),
            (second["callback_token"], done2 | {"generation": 1, "wake_id": second["wake_id"]}),
        ]:
            r = await callback(token, body)
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "FENCED"
        r = await callback(first["callback_token"][:-3] + "abc", done2 | current)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "TOKEN_INVALID"
        streams = (await get_sub(client, "stale"))["streams"]
        assert streams[0]["acked_offset"] == tail1  # nothing stale moved the cursor

        r = await callback(second["callback_token"], done2 | current)
        assert r.status_code == 200, r.text
        assert (await get_sub(client, "stale"))["streams"][0]["acked_offset"] == tail2
        # A deleted subscription's in-flight callbacks fail and move nothing.
        r = await client.delete("/v1/stream/__ds/subscriptions/stale")
        assert r.status_code == 204
        r = await callback(second["callback_token"], done2 | current)
        assert r.status_code == 404
        nursery.cancel_scope.cancel()
