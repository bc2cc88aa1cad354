"""The subscriptions this shard owns: their HTTP API, wakes, leases and deliveries.

A subscription is owned by the shard its id hashes to (`owner_key`); every request about
it comes here (the gateway routes `__ds/subscriptions/:id/...` by id). Rules are decided
by `shard.core.subscriptions`; this module keeps the state in memory, persists every
change before answering (`SubDb.save`), asks the shards that own the streams for
registrations and tails (`Peers`), and delivers wakes: webhooks over HTTP (signed,
retried with backoff persisted in the state), pull-wake events appended to the wake
stream as an idempotent producer whose epoch is the wake's generation, so a wake event
is written once per generation even when its append is retried after a crash.

One task (`run`) sleeps until the next due time of any subscription (a webhook attempt,
a lease end) or until a change; deliveries run as tasks of its nursery, each under a
deadline. Changes to one subscription are serialized by its lock.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from secrets import token_hex
from typing import Any, Protocol
from urllib.parse import urlsplit

import certifi
import httpcore  # noqa: F401 - imported with us, not on the loop by the first client
import httpx
import trio

from ds_cluster.shard.committer import StorageUnavailable
from ds_cluster.shard.core import subscriptions as rules
from ds_cluster.shard.core.subscriptions import Sub, SubConfig, SubError
from ds_cluster.shard.subscriptions.db import SubDb
from ds_cluster.shard.subscriptions.keys import SigningKeys

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 10.0  # seconds for one webhook attempt, connect to last byte
MAX_WEBHOOK_ANSWER = 64 * 1024  # bytes of a webhook's answer read (for `{done: true}`)
JSON = ("content-type", "application/json")

HttpAnswer = tuple[int, list[tuple[str, str]], bytes]


def owner_key(sub_id: str) -> str:
    """What the ring hashes to place a subscription."""
    return f"__ds/subscriptions/{sub_id}"


class SubscriptionsUnavailable(Exception):
    """A shard the request needs could not be reached; nothing was decided."""


class SubElsewhere(SubscriptionsUnavailable):
    """The ring gives this subscription to another shard now (it is moving or moved)."""


class SubArriving(SubscriptionsUnavailable):
    """This shard owns the subscription, but it may still be on its way here."""


class Peers(Protocol):
    """The shards that own streams, this one included (`shard.subscriptions`)."""

    async def register(
        self, sub_id: str, pattern: str | None, paths: tuple[str, ...]
    ) -> dict[str, str]: ...

    async def unregister(self, sub_id: str, paths: list[str] | None, everywhere: bool) -> None: ...

    async def tails(self, paths: list[str]) -> dict[str, str | None]: ...

    async def append_wake(self, path: str, body: bytes, producer: str, epoch: int) -> int: ...


def answer(
    status: int, body: dict[str, Any] | None = None, extra: tuple[tuple[str, str], ...] = ()
) -> HttpAnswer:
    if body is None:
        return status, list(extra), b""
    return status, [JSON, *extra], json.dumps(body, separators=(",", ":")).encode()


class SubOwner:
    def __init__(self, db: SubDb, keys: SigningKeys, peers: Peers) -> None:
        self._db = db
        self._keys = keys
        self._peers = peers
        self._subs: dict[str, Sub] = {}
        self._creating: dict[str, list[tuple[str, str | None]]] = {}  # id -> notices held
        self._locks: dict[str, trio.Lock] = {}
        self._attempting: set[str] = set()  # subs with a delivery or lease expiry running
        self._changed = trio.Event()
        self._client: httpx.AsyncClient | None = None
        self._idle: dict[str, trio.Event] = {}  # set when the sub's running task ends
        # Set by `Subscriptions` / `move.SubMover`: does the ring give `id` to this
        # shard, and may a subscription it owns but does not hold still arrive?
        self.owns: Callable[[str], bool] = lambda sub_id: True
        self.arriving: Callable[[], bool] = lambda: False

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        self._subs = {sub.id: sub for sub in self._db.load_subs()}

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        # The client's TLS context loads the CA bundle: 250-450 ms of CPU on a loaded
        # machine, which on the loop would stall every request of a starting shard.
        verify = await trio.to_thread.run_sync(_webhook_tls_context)
        async with (
            httpx.AsyncClient(
                timeout=WEBHOOK_TIMEOUT,
                follow_redirects=False,
                limits=limits,
                trust_env=False,
                verify=verify,
            ) as client,
            trio.open_nursery() as nursery,
        ):
            self._client = client
            while True:
                now = time.time()
                due = self._next_due(now, nursery)
                self._changed = trio.Event()
                with trio.move_on_after(max(0.0, due - now)):
                    await self._changed.wait()

    def _next_due(self, now: float, nursery: trio.Nursery) -> float:
        """Start what is due now; return when the next thing is due."""
        soonest = now + 3600
        for sub in list(self._subs.values()):
            if not self.owns(sub.id):
                continue  # fenced: it is being handed to its new owner
            if sub.delivering:
                if sub.id in self._attempting:
                    continue
                at = sub.next_attempt_at or now
                if at <= now:
                    self._attempting.add(sub.id)
                    nursery.start_soon(self._attempt, sub.id)
                else:
                    soonest = min(soonest, at)
            elif sub.lease_until is not None:
                if sub.lease_until <= now:
                    if sub.id not in self._attempting:
                        self._attempting.add(sub.id)
                        nursery.start_soon(self._expire, sub.id)
                else:
                    soonest = min(soonest, sub.lease_until)
        return soonest

    @asynccontextmanager
    async def _locked(self, sub_id: str) -> AsyncIterator[Sub | None]:
        """The sub under its lock; SubElsewhere once the ring gives it to another shard."""
        async with self.locked(sub_id) as sub:
            if not self.owns(sub_id):
                raise SubElsewhere(f"subscription {sub_id[:100]!r} moved to another shard")
            yield sub

    @asynccontextmanager
    async def locked(self, sub_id: str) -> AsyncIterator[Sub | None]:
        """The sub under its lock, whoever owns it now (for moving it)."""
        lock = self._locks.setdefault(sub_id, trio.Lock())
        try:
            async with lock:
                yield self._subs.get(sub_id)
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._locks.pop(sub_id, None)

    # -- moving (`move.SubMover`) ----------------------------------------------------------

    def ids(self) -> list[str]:
        return list(self._subs)

    async def quiesce(self, sub_id: str, timeout: float) -> None:
        """Wait for the delivery or lease expiry running for `sub_id` (none starts once
        the ring gives it away) to end and be saved."""
        with trio.move_on_after(timeout):
            while sub_id in self._attempting:
                await self._idle.setdefault(sub_id, trio.Event()).wait()

    async def forget(self, sub_id: str) -> None:
        """Under the sub's lock: its new owner committed it; drop our row."""
        sub = self._subs.pop(sub_id, None)
        try:
            await self._db.save([], deleted=[sub_id])
        except BaseException:
            if sub is not None:
                self._subs[sub_id] = sub
            raise

    async def adopt(self, sub: Sub) -> bool:
        """A subscription arrived whole: commit it, then hold it. False if this shard
        holds it already (a retried move: ours may have changed since, it stays)."""
        async with self.locked(sub.id) as held:
            if held is not None:
                return False
            await self._db.save([sub])
            self._subs[sub.id] = sub
        self._changed.set()  # its retry schedule or lease goes on here
        return True

    async def register_again(self, sub_id: str) -> None:
        """Register a subscription this shard owns under the current ring, and take the
        tails the answers carry as notices (appends made before a shard knew of it)."""
        sub = self._subs.get(sub_id)
        if sub is None:
            return
        explicit = tuple(path for path, link in sub.links.items() if link.explicit)
        tails = await self._peers.register(sub_id, sub.config.pattern, explicit)
        async with self._locked(sub_id) as sub:
            if sub is None:
                return
            linked = False
            for path, tail in tails.items():
                linked |= rules.note_tail(sub, path, tail) == "links"
            if await self._wake_if_pending(sub) or linked:
                await self._save(sub)  # as for notices: a tail alone is not worth a write

    def _ended(self, sub_id: str) -> None:
        self._attempting.discard(sub_id)
        idle = self._idle.pop(sub_id, None)
        if idle is not None:
            idle.set()
        self._changed.set()

    async def _save(self, sub: Sub) -> None:
        await self._db.save([sub])
        self._changed.set()

    # -- wakes ---------------------------------------------------------------------------------

    async def _wake_if_pending(self, sub: Sub) -> bool:
        """Under the sub's lock: start a wake if it is idle with pending work."""
        if not rules.should_wake(sub):
            return False
        rules.start_wake(sub, f"w_{token_hex(12)}", time.time())
        return True

    async def _rewake(self, sub: Sub) -> bool:
        """Under the sub's lock, after a wake ended: the linked streams' current tails
        (tails noted during the wake were not persisted), then a new wake if work is
        pending."""
        try:
            await self._refresh(sub)
        except (SubscriptionsUnavailable, StorageUnavailable) as exc:
            log.info("tails of %s not refreshed: %s", sub.id, exc)
        return await self._wake_if_pending(sub)

    async def _attempt(self, sub_id: str) -> None:
        """One delivery attempt of the current wake: a webhook POST or a wake event."""
        try:
            async with self._locked(sub_id) as sub:
                if sub is None or not sub.delivering:
                    return
                wake_id, generation = sub.wake_id, sub.generation
                if sub.config.type == "webhook":
                    token = rules.make_token(self._keys.token_key, sub, time.time())
                    body = rules.webhook_body(sub, token)
                else:
                    body = rules.wake_event(
                        sub, rules.first_pending(sub) or "", int(time.time() * 1000)
                    )
                    producer = f"__ds-sub-{sub.id}-{sub.hash[:12]}-{sub.created_at}"
            if sub.config.type == "webhook":
                ok, done = await self._post_webhook(sub.config.webhook_url or "", body)
            else:
                ok, done = (
                    await self._append_event(
                        sub.config.wake_stream or "", body, producer, generation
                    ),
                    False,
                )
            async with self._locked(sub_id) as sub:
                if sub is None or sub.wake_id != wake_id or not sub.delivering:
                    return
                now = time.time()
                if ok:
                    if sub.config.type == "webhook":
                        rules.delivered(sub, now, done)
                        if done:
                            await self._rewake(sub)
                    else:
                        rules.event_written(sub)
                else:
                    rules.delivery_failed(sub, now, random.random())
                await self._save(sub)
        except (StorageUnavailable, SubscriptionsUnavailable) as exc:
            log.warning("delivery of %s: %s; tried again later", sub_id, exc)
        except Exception:  # a bug costs this attempt, not the shard
            log.exception("delivery of %s failed", sub_id)
        finally:
            self._ended(sub_id)

    async def _post_webhook(self, url: str, body: bytes) -> tuple[bool, bool]:
        """(accepted, answered `{done: true}`)."""
        assert self._client is not None
        host = rules.needs_resolving(url)
        if host is not None:  # a name must resolve to public addresses only (SSRF)
            try:
                port = urlsplit(url).port or 443
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.info("webhook %s: cannot resolve %s: %s", url, host, exc)
                return False, False
            addresses = [str(info[4][0]) for info in infos]
            if not rules.all_public(addresses):
                log.warning("webhook %s refused: %s resolves to %s", url, host, addresses)
                return False, False
        headers = {
            "content-type": "application/json",
            "webhook-signature": self._keys.signature_header(body, int(time.time())),
        }
        try:
            with trio.fail_after(WEBHOOK_TIMEOUT + 1):
                async with self._client.stream("POST", url, content=body, headers=headers) as res:
                    raw = b""
                    async for chunk in res.aiter_bytes():
                        raw += chunk
                        if len(raw) > MAX_WEBHOOK_ANSWER:
                            break
        except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
            log.info("webhook %s failed: %s", url, exc)
            return False, False
        if not 200 <= res.status_code < 300:
            log.info("webhook %s answered %d", url, res.status_code)
            return False, False
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return True, isinstance(parsed, dict) and parsed.get("done") is True

    async def _append_event(
        self, wake_stream: str, body: bytes, producer: str, generation: int
    ) -> bool:
        try:
            status = await self._peers.append_wake(wake_stream, body, producer, generation)
        except Exception as exc:  # the wake stream's shard is unavailable: retried
            log.info("wake event to %s deferred: %s", wake_stream, exc)
            return False
        if status in (200, 204, 403):  # written, a duplicate, or a newer generation's
            return True
        log.info("wake event to %s refused (%d); retried", wake_stream, status)
        return False

    async def _expire(self, sub_id: str) -> None:
        try:
            async with self._locked(sub_id) as sub:
                if sub is None or not rules.lease_expired(sub, time.time()):
                    return
                await self._rewake(sub)
                await self._save(sub)
        except StorageUnavailable as exc:
            log.warning("lease expiry of %s not saved: %s", sub_id, exc)
        except Exception:  # a bug costs this expiry, not the shard
            log.exception("lease expiry of %s failed", sub_id)
        finally:
            self._ended(sub_id)

    # -- notices from the shards that own the streams --------------------------------------

    async def notify(self, items: list[tuple[str, str, str | None]]) -> list[str]:
        """New tails of linked or matching streams; returns the ids this shard does not
        own a subscription for (their registrations can go). SubscriptionsUnavailable
        (after the others are applied) if some belong to another shard now or may still
        arrive here: the notifier keeps them and sends them again."""
        by_sub: dict[str, list[tuple[str, str | None]]] = {}
        for sub_id, path, tail in items:
            by_sub.setdefault(sub_id, []).append((path, tail))
        gone = []
        refused = 0
        changed: list[Sub] = []
        for sub_id, tails in by_sub.items():
            held = self._creating.get(sub_id)
            if held is not None:
                held.extend(tails)
                continue
            if not self.owns(sub_id):
                refused += 1
                continue
            async with self._locked(sub_id) as sub:
                if sub is None:
                    if self.arriving():
                        refused += 1
                    else:
                        gone.append(sub_id)
                    continue
                linked = False
                for path, tail in tails:
                    linked |= rules.note_tail(sub, path, tail) == "links"
                if await self._wake_if_pending(sub) or linked:
                    changed.append(sub)
        if changed:
            await self._db.save(changed)
            self._changed.set()
        if refused:
            raise SubscriptionsUnavailable(f"{refused} subscriptions are moving; sent again")
        return gone

    # -- HTTP ----------------------------------------------------------------------------------

    async def http(self, method: str, path: str, auth: str, base: str, body: bytes) -> HttpAnswer:
        """A request under `__ds/`: the JWK Set, or a subscription route."""
        parts = path.split("/")
        sub_id = parts[2] if len(parts) >= 3 and parts[1] == "subscriptions" else None
        if sub_id is not None and sub_id not in self._subs and self.arriving():
            raise SubArriving(f"subscription {sub_id[:100]!r} may be on its way here")
        try:
            return await self._route(method, path, auth, base, body)
        except SubError as exc:
            if sub_id is not None and exc.status == 404 and not self.owns(sub_id):
                raise SubElsewhere("the subscription moved while the request waited") from None
            return answer(exc.status, exc.body())
        except (SubElsewhere, SubArriving):
            raise
        except (SubscriptionsUnavailable, StorageUnavailable) as exc:
            refusal = _error("UNAVAILABLE", f"try again: {exc}")
            return answer(503, refusal, (("retry-after", "1"),))

    async def _route(self, method: str, path: str, auth: str, base: str, body: bytes) -> HttpAnswer:
        if path == "__ds/jwks.json":
            if method not in ("GET", "HEAD"):
                return answer(
                    405, _error("METHOD_NOT_ALLOWED", "use GET"), (("allow", "GET, HEAD"),)
                )
            headers = [
                ("content-type", "application/jwk-set+json"),
                ("cache-control", "public, max-age=300"),
            ]
            return 200, headers, self._keys.jwks()
        parts = path.split("/")
        if len(parts) < 3 or parts[1] != "subscriptions" or not parts[2]:
            raise SubError(404, "NOT_FOUND", "no such Durable Streams control route")
        sub_id = rules.check_id(parts[2])
        rest = parts[3:]
        if not rest:
            if method == "PUT":
                return await self._create(sub_id, rules.parse_config(body), base)
            if method in ("GET", "HEAD"):
                sub = self._subs.get(sub_id)
                if sub is None:
                    raise _not_found()
                return answer(200, rules.describe(sub, self._keys.kid))
            if method == "DELETE":
                await self._delete(sub_id)
                return answer(204)
            return _not_allowed("GET, PUT, DELETE")
        action = rest[0]
        if action == "streams" and len(rest) == 1:
            if method != "POST":
                return _not_allowed("POST")
            await self._add_streams(sub_id, rules.parse_streams_body(body))
            return answer(204)
        if action == "streams":
            if method != "DELETE":
                return _not_allowed("DELETE")
            await self._remove_stream(sub_id, rules.check_stream_path("/".join(rest[1:])))
            return answer(204)
        if len(rest) == 1 and action in ("callback", "claim", "ack", "release"):
            if method != "POST":
                return _not_allowed("POST")
            data = rules.parse_json(body)
            if not isinstance(data, dict):
                raise rules.invalid("the request body must be a JSON object")
            if action == "claim":
                return await self._claim(sub_id, data)
            return await self._finish(sub_id, action, auth, data)
        raise SubError(404, "NOT_FOUND", "no such subscription route")

    async def _create(self, sub_id: str, config: SubConfig, base: str) -> HttpAnswer:
        async with self._locked(sub_id) as existing:
            if existing is not None:
                if existing.hash != rules.config_hash(config):
                    raise SubError(
                        409,
                        "SUBSCRIPTION_ALREADY_EXISTS",
                        "a subscription with this id exists with a different configuration",
                    )
                return answer(200, rules.describe(existing, self._keys.kid))
            self._creating[sub_id] = []
            try:
                tails = await self._peers.register(sub_id, config.pattern, config.streams)
                created_at = (
                    datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                )
                sub = rules.new_sub(sub_id, config, created_at, base, tails)
                for path, tail in self._creating.pop(sub_id):
                    rules.note_tail(sub, path, tail)
                self._subs[sub_id] = sub  # later notices wait for our lock, then apply
                await self._wake_if_pending(sub)
                try:
                    await self._save(sub)
                except BaseException:
                    self._subs.pop(sub_id, None)
                    raise
            finally:
                self._creating.pop(sub_id, None)
            return answer(201, rules.describe(sub, self._keys.kid))

    async def _delete(self, sub_id: str) -> None:
        async with self._locked(sub_id) as sub:
            if sub is None:
                return
            del self._subs[sub_id]
            try:
                await self._db.save([], deleted=[sub_id])
            except BaseException:
                self._subs[sub_id] = sub
                raise
        self._changed.set()
        # Registrations left behind (a shard unreachable now) are dropped at that
        # shard's next notice: this shard answers that the subscription is gone.
        try:
            await self._peers.unregister(sub_id, None, everywhere=True)
        except Exception as exc:
            log.info("unregistering %s: %s (dropped at the next notice)", sub_id, exc)

    async def _add_streams(self, sub_id: str, paths: tuple[str, ...]) -> None:
        async with self._locked(sub_id) as sub:
            if sub is None:
                raise _not_found()
            tails = await self._peers.register(sub_id, None, paths)
            rules.add_explicit(sub, {p: tails.get(p, rules.ZERO_OFFSET) for p in paths})
            await self._save(sub)

    async def _remove_stream(self, sub_id: str, path: str) -> None:
        async with self._locked(sub_id) as sub:
            if sub is None:
                raise _not_found()
            rules.remove_explicit(sub, path)
            await self._save(sub)
        try:
            await self._peers.unregister(sub_id, [path], everywhere=False)
        except Exception as exc:
            log.info("unregistering %s from %s: %s", sub_id, path, exc)

    async def _refresh(self, sub: Sub) -> None:
        """Ask the streams' owners for the linked streams' current tails."""
        tails = await self._peers.tails(list(sub.links))
        for path, tail in tails.items():
            if path in sub.links:
                rules.note_tail(sub, path, tail if tail is not None else rules.ZERO_OFFSET)

    async def _claim(self, sub_id: str, data: dict[str, Any]) -> HttpAnswer:
        worker = data.get("worker")
        if not isinstance(worker, str) or not worker or len(worker) > 200:
            raise rules.invalid("worker must be a non-empty string")
        async with self._locked(sub_id) as sub:
            if sub is None:
                raise _not_found()
            if sub.config.type != "pull-wake":
                raise rules.invalid("subscription is not pull-wake")
            if sub.holder is not None:
                rules.claim(sub, worker, time.time())  # raises ALREADY_CLAIMED
            await self._refresh(sub)
            if sub.wake_id is None:
                if not rules.has_pending(sub):
                    raise SubError(409, "NO_PENDING_WORK", "the subscription has no pending work")
                await self._wake_if_pending(sub)
            now = time.time()
            rules.claim(sub, worker, now)
            token = rules.make_token(self._keys.token_key, sub, now)
            await self._save(sub)
            return answer(200, rules.claim_body(sub, token))

    async def _finish(
        self, sub_id: str, action: str, auth: str, data: dict[str, Any]
    ) -> HttpAnswer:
        """callback (webhook), ack and release (pull-wake): fenced by token, generation
        and wake id."""
        token = rules.bearer(auth)
        async with self._locked(sub_id) as sub:
            if sub is None:
                raise _not_found()
            kind = "webhook" if action == "callback" else "pull-wake"
            if sub.config.type != kind:
                raise rules.invalid(f"subscription is not {kind}")
            now = time.time()
            claims = rules.read_token(self._keys.token_key, token, sub_id, now)
            rules.check_fence(sub, claims, data.get("generation"), data.get("wake_id"))
            if action == "release":
                rules.end_wake(sub)
                await self._rewake(sub)
                await self._save(sub)
                return answer(204)
            acks = rules.parse_acks(data)
            if any(sub.links.get(p) is not None and o > sub.links[p].tail for p, o in acks):
                await self._refresh(sub)  # the worker may have read past what we know
            rules.check_acks(sub, acks)
            done = data.get("done") is True
            rules.apply_acks(sub, acks, now, done)
            next_wake = await self._rewake(sub) if done else False
            await self._save(sub)
            return answer(200, {"ok": True, "next_wake": next_wake})


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _not_found() -> SubError:
    return SubError(404, "SUBSCRIPTION_NOT_FOUND", "subscription not found")


def _not_allowed(allow: str) -> HttpAnswer:
    return answer(405, _error("METHOD_NOT_ALLOWED", "method not allowed"), (("allow", allow),))


def _webhook_tls_context() -> ssl.SSLContext:
    """What httpx builds by default (certifi's CA bundle), built off the loop."""
    return ssl.create_default_context(cafile=certifi.where())
