"""The rebalance driver: move a cluster onto a new ring and wait until every move is done.

    ring = await rebalance(endpoints, new_ring, progress, secret=secret)

`endpoints` are the shards to start from (any of them will do to learn the current
ring; the drivers pass every shard they know). The driver asks each for its ring
(`ring_get`), connects to every shard of the current and the new ring, sends the new
ring to all of them (`ring_set`: each adopts it, passes it on, and starts moving the
streams it no longer owns), then asks each for `move_status` every POLL_INTERVAL
seconds -- an explicit, bounded poll of remote processes, which have no event to wait
on -- and reports streams and bytes moved and left, until every shard of both rings
reports done under the new ring. Shards that leave the ring are then empty: the caller
may stop them.

Used by the supervisor (`ds-cluster scale`, `ds-cluster up --shards` on a dir recorded
with another count) and, without a supervisor, by `ds-cluster rebalance` (Kubernetes).
Idempotent: driving a cluster already on `new_ring` just waits for its moves to finish,
so a driver that died midway is simply run again.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from ds_cluster.common.ring import Endpoint, Ring
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardUnavailable

log = logging.getLogger("ds_cluster.rebalance")

POLL_INTERVAL = 0.5
CALL_TIMEOUT = 10.0
CONNECT_TIMEOUT = 30.0  # a shard just started (or restarting) gets this long to answer
LEAVE_GRACE = 5.0  # seconds between "all done" and "leaving shards may stop"
STALL_TIMEOUT = 120.0  # no stream or byte moved for this long while moves remain: failure
ROLE = "gateway"  # the handshake's caller roles are "gateway" and "shard"
NAME = "rebalance"


class RebalanceError(Exception):
    """The cluster could not be moved onto the new ring (it keeps serving)."""


@dataclass
class ShardState:
    """One shard's answer to `move_status` (or why there was none)."""

    ring_version: int = 0
    streams: int = 0
    bytes: int = 0
    out_streams: int = 0
    out_bytes: int = 0
    pending_in: int = 0
    done: bool = False
    error: str = ""
    # streams and bytes this process sent away so far (`moved_out`, when the shard says)
    sent_streams: int = 0
    sent_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ring_version": self.ring_version,
            "streams": self.streams,
            "bytes": self.bytes,
            "moving_out": {"streams": self.out_streams, "bytes": self.out_bytes},
            "pending_in": self.pending_in,
            "done": self.done,
            **({"error": self.error} if self.error else {}),
        }

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> ShardState:
        """A `move_status` answer checked field by field (RebalanceError if malformed)."""
        try:
            version = Ring.from_wire(answer.get("ring")).version
        except ValueError as exc:
            raise RebalanceError(f"a shard answered move_status with a bad ring: {exc}") from None
        out, sent = answer.get("moving_out"), answer.get("moved_out")
        done = answer.get("done")
        if type(out) is not dict or type(done) is not bool:
            raise RebalanceError(f"a shard answered move_status malformed: {dict(answer)!r:.200}")
        optional = sent if type(sent) is dict else {}
        return cls(
            version,
            _count(answer.get("streams")),
            _count(answer.get("bytes")),
            _count(out.get("streams")),
            _count(out.get("bytes")),
            _count(answer.get("pending_in")),
            done,
            sent_streams=_count(optional.get("streams", 0)),
            sent_bytes=_count(optional.get("bytes", 0)),
        )


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise RebalanceError(f"a shard answered move_status with a bad count: {value!r:.40}")
    return value


@dataclass
class Progress:
    """Where a rebalance stands: per shard, and totals since it began."""

    ring: Ring
    shards: dict[str, ShardState] = field(default_factory=dict)
    elapsed: float = 0.0
    # The most streams/bytes seen left to move: what has moved is that minus what is left.
    peak_streams: int = 0
    peak_bytes: int = 0
    # Each shard before the new ring was sent: a move that ends between two polls is seen
    # as what its source no longer holds.
    before: dict[str, ShardState] = field(default_factory=dict)

    @property
    def left_streams(self) -> int:
        return sum(s.out_streams for s in self.shards.values())

    @property
    def left_bytes(self) -> int:
        return sum(s.out_bytes for s in self.shards.values())

    @property
    def pending_in(self) -> int:
        return sum(s.pending_in for s in self.shards.values())

    @property
    def moved_streams(self) -> int:
        return max(
            self.peak_streams - self.left_streams,
            self._handed_over("streams"),
            self._sent("sent_streams"),
        )

    @property
    def moved_bytes(self) -> int:
        """From the shards' own counts of bytes sent when they give them; else as the
        polls saw them move (a shard's `bytes` is its storage, which does not shrink as
        streams leave)."""
        return max(self.peak_bytes - self.left_bytes, self._sent("sent_bytes"))

    def _sent(self, what: str) -> int:
        """What the shards sent since the ring changed (a restarted shard counts anew)."""
        total = 0
        for sid, now in self.shards.items():
            if now.error:
                continue
            old = self.before.get(sid)
            sent, earlier = getattr(now, what), getattr(old, what) if old else 0
            total += sent - earlier if sent >= earlier else sent
        return total

    def _handed_over(self, what: str) -> int:
        """How many fewer streams the shards hold than before the ring changed (new
        streams only add, so this is what moved away, at least)."""
        return sum(
            max(0, getattr(old, what) - getattr(self.shards[sid], what))
            for sid, old in self.before.items()
            if not old.error and sid in self.shards and not self.shards[sid].error
        )

    @property
    def done(self) -> bool:
        return bool(self.shards) and all(
            s.done and not s.error and s.ring_version >= self.ring.version
            for s in self.shards.values()
        )

    def line(self) -> str:
        """One human-readable progress line."""
        waiting = sorted(sid for sid, s in self.shards.items() if not s.done or s.error)
        errors = "; ".join(f"{sid}: {s.error}" for sid, s in sorted(self.shards.items()) if s.error)
        text = (
            f"ring v{self.ring.version}: moved {self.moved_streams} streams "
            f"({size_text(self.moved_bytes)}), left {self.left_streams} streams "
            f"({size_text(self.left_bytes)}), {self.pending_in} incoming; "
            + (f"waiting for {', '.join(waiting)}" if waiting else "all shards done")
        )
        return text + (f" [{errors}]" if errors else "") + f" ({self.elapsed:.1f} s)"

    def to_json(self) -> dict[str, Any]:
        return {
            "ring_version": self.ring.version,
            "moved_streams": self.moved_streams,
            "moved_bytes": self.moved_bytes,
            "left_streams": self.left_streams,
            "left_bytes": self.left_bytes,
            "pending_in": self.pending_in,
            "done": self.done,
            "elapsed": round(self.elapsed, 3),
            "shards": {sid: s.to_json() for sid, s in sorted(self.shards.items())},
        }


def size_text(n: int) -> str:
    """A byte count for people: 512 B, 1.5 KiB, 3.2 MiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


async def current_rings(
    endpoints: Mapping[str, Endpoint],
    *,
    secret: bytes,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> dict[str, Ring]:
    """Each reachable shard's ring (`ring_get`), by shard id; shards that do not answer
    within `timeout` are left out."""
    rings: dict[str, Ring] = {}
    probe = Ring(0, tuple(endpoints), endpoints)
    async with _pool(endpoints, probe, secret, ssl_context) as pool:
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for sid in endpoints:
                    nursery.start_soon(_ring_of, pool, sid, rings)
    return rings


async def shard_states(
    endpoints: Mapping[str, Endpoint],
    *,
    secret: bytes,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = CALL_TIMEOUT,
) -> dict[str, ShardState]:
    """Each shard's `move_status` (streams, bytes, moves), for status reports; a shard
    that does not answer within `timeout` has its `error` set."""
    state = Progress(Ring(0, tuple(endpoints), endpoints))
    async with _pool(endpoints, state.ring, secret, ssl_context) as pool:
        with trio.move_on_after(timeout):
            await pool.wait_connected()
        await _poll(pool, endpoints, None, state)
    return state.shards


async def _ring_of(pool: ShardPool, shard_id: str, into: dict[str, Ring]) -> None:
    answer = await _call_when_connected(pool, shard_id, "ring_get", {})
    try:
        into[shard_id] = Ring.from_wire(answer.get("ring"))
    except ValueError as exc:
        log.warning("%s answered ring_get with a bad ring: %s", shard_id, exc)


async def _call_when_connected(
    pool: ShardPool, shard_id: str, op: str, args: Mapping[str, Any]
) -> dict[str, Any]:
    """`op` on `shard_id`, waiting for its connection and retrying while it is
    unavailable (cancel the caller to give up)."""
    while True:
        await pool.wait_connected(shard_id)
        try:
            return await pool.call(shard_id, op, args, timeout=CALL_TIMEOUT)
        except ShardUnavailable as exc:
            log.info("%s: %s; retrying", op, exc)
            await trio.sleep(POLL_INTERVAL)


def _pool(
    endpoints: Mapping[str, Endpoint], ring: Ring, secret: bytes, ssl_context: ssl.SSLContext | None
) -> ShardPool:
    # drop_departed=False: a shard that leaves the ring is still asked until it is done.
    return ShardPool(
        endpoints,
        ring,
        role=ROLE,
        name=NAME,
        secret=secret,
        ssl_context=ssl_context,
        drop_departed=False,
    )


def plan_ring(
    rings: Mapping[str, Ring], shard_ids: tuple[str, ...], endpoints: Mapping[str, Endpoint]
) -> Ring:
    """The ring to move to for `ring-version auto`: the newest ring the shards hold if it
    already is `shard_ids` at `endpoints` (a rerun), else one version above it. Version 0
    is never kept: it is the provisional ring of processes started from a DNS pattern
    (Kubernetes), which a pod started later with another shard count also claims."""
    newest = max(rings.values(), key=lambda r: r.version, default=None)
    wanted = Ring(newest.version + 1 if newest else 1, shard_ids, endpoints)
    if (
        newest is not None
        and newest.version > 0
        and newest.shard_ids == wanted.shard_ids
        and all(newest.endpoints.get(sid) == ep for sid, ep in wanted.endpoints.items())
    ):
        return newest
    return wanted


async def rebalance(
    endpoints: Mapping[str, Endpoint],
    new_ring: Ring,
    progress: Callable[[Progress], None],
    *,
    secret: bytes,
    ssl_context: ssl.SSLContext | None = None,
    stall_timeout: float = STALL_TIMEOUT,
    poll_interval: float = POLL_INTERVAL,
    before: dict[str, ShardState] | None = None,
) -> Progress:
    """Move the cluster onto `new_ring`; return the final progress (done). See the module
    docstring. RebalanceError when a shard holds a newer ring, or nothing moved for
    `stall_timeout` seconds. `before`: the shards' states before anything could move
    (`shard_states`), for the figures; taken here when not given."""
    known: dict[str, Endpoint] = {**endpoints, **new_ring.endpoints}
    # Bounded short: a shard that does not answer now gets the ring from its peers or from
    # a later poll, and meanwhile progress is reported.
    rings = await current_rings(known, secret=secret, ssl_context=ssl_context, timeout=CALL_TIMEOUT)
    newer = [f"{sid} (v{r.version})" for sid, r in rings.items() if r.version > new_ring.version]
    if newer:
        raise RebalanceError(
            f"{', '.join(newer)} already hold a ring newer than v{new_ring.version}: "
            "another rebalance ran since; run again with the current shard list"
        )
    # Every shard of every ring seen still owns streams until the new ring says otherwise.
    for ring in rings.values():
        for sid, ep in ring.endpoints.items():
            known.setdefault(sid, ep)
    known.update(new_ring.endpoints)
    missing = sorted(set(new_ring.shard_ids) - set(known))
    if missing:
        raise RebalanceError(f"no address for {', '.join(missing)}")
    state = Progress(new_ring)
    started = trio.current_time()
    async with _pool(known, new_ring, secret, ssl_context) as pool:
        if before is None:
            baseline = Progress(new_ring)
            with trio.move_on_after(CALL_TIMEOUT):
                await pool.wait_connected()
            await _poll(pool, known, None, baseline)
            before = baseline.shards
        state.before = before
        await _send_ring(pool, known, new_ring)
        last_change = trio.current_time()
        last_left: tuple[int, int, int] | None = None
        while True:
            await _poll(pool, known, new_ring, state)
            state.elapsed = trio.current_time() - started
            progress(state)
            if state.done:
                if set(known) - set(new_ring.shard_ids):
                    # The remaining shards ask each shard of the old ring, every couple of
                    # seconds, whether it still holds anything for them, and stop asking
                    # once it says no; a shard may report done before it asked. A leaving
                    # shard stopped by then could never answer: give them the time.
                    await trio.sleep(LEAVE_GRACE)
                return state
            left = (state.left_streams, state.left_bytes, state.pending_in)
            if left != last_left:
                last_left, last_change = left, trio.current_time()
            elif trio.current_time() - last_change > stall_timeout:
                raise RebalanceError(f"nothing moved for {stall_timeout:g} s: {state.line()}")
            await trio.sleep(poll_interval)


async def _send_ring(pool: ShardPool, shards: Mapping[str, Endpoint], ring: Ring) -> None:
    """`ring_set` on every shard (each also passes it on; a shard that is down now gets it
    from its peers, or from the next poll)."""
    with trio.move_on_after(CALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for sid in shards:
                nursery.start_soon(_set_ring, pool, sid, ring)


async def _set_ring(pool: ShardPool, shard_id: str, ring: Ring) -> None:
    try:
        answer = await _call_when_connected(pool, shard_id, "ring_set", {"ring": ring.to_wire()})
    except ShardError as exc:
        log.warning("%s refused ring_set v%d: %s", shard_id, ring.version, exc)
        return
    try:
        held = Ring.from_wire(answer.get("ring")).version
    except ValueError:
        held = -1
    if held < ring.version:
        log.warning("%s holds ring v%d after ring_set v%d", shard_id, held, ring.version)


async def _poll(
    pool: ShardPool, shards: Mapping[str, Endpoint], ring: Ring | None, state: Progress
) -> None:
    """One `move_status` round over every shard, concurrently, each bounded; a shard
    found on a ring older than `ring` is sent `ring` again."""

    async def one(shard_id: str) -> None:
        shard = state.shards.setdefault(shard_id, ShardState())
        try:
            answer = await pool.call(shard_id, "move_status", {}, timeout=CALL_TIMEOUT)
            fresh = ShardState.from_answer(answer)
        except (ShardUnavailable, ShardError, RebalanceError) as exc:
            shard.error = str(exc)
            return
        state.shards[shard_id] = fresh
        if (
            ring is not None and fresh.ring_version < ring.version
        ):  # restarted from an older ring, or missed it
            with trio.move_on_after(CALL_TIMEOUT):
                await _set_ring(pool, shard_id, ring)

    async with trio.open_nursery() as nursery:
        for sid in shards:
            nursery.start_soon(one, sid)
    state.peak_streams = max(state.peak_streams, state.left_streams)
    state.peak_bytes = max(state.peak_bytes, state.left_bytes)
