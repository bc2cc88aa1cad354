"""Shared bookkeeping of a chaos run: what was planned, acknowledged, seen and violated.

Writers and readers only append to these records; the verifier and the reporter only read
them. Keeping them plain data makes the verifier a pure function that unit tests can feed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamPlan:
    """One stream under test. `prefix` is the inherited content of a fork (ids in order)."""

    path: str
    content_type: str
    shard: str
    writers: list[str] = field(default_factory=list)
    fork_of: str | None = None
    fork_offset: str | None = None
    prefix: list[str] = field(default_factory=list)
    created: bool = False
    moves: int = 0  # how many scales changed its owner


@dataclass
class WriterLedger:
    """What one idempotent producer knows about its own writes.

    `acked` holds every acknowledged batch in send order; `pending` the batch whose outcome
    was still unknown when the run stopped (it may or may not be stored, but atomically);
    `rejected` batches answered with a definitive 4xx (they must not be stored).
    `fork_points` are (Stream-Next-Offset after batch i, i) taken from 200 answers.
    """

    name: str
    stream: str
    acked: list[list[str]] = field(default_factory=list)
    pending: list[str] | None = None
    rejected: list[list[str]] = field(default_factory=list)
    fork_points: list[tuple[str, int]] = field(default_factory=list)

    def acked_ids(self, upto_batch: int | None = None) -> list[str]:
        batches = self.acked if upto_batch is None else self.acked[: upto_batch + 1]
        return [mid for batch in batches for mid in batch]


@dataclass
class ReaderLog:
    """The ids one live reader committed, in order (data counted only once its control
    event or response arrived, as a resuming client would)."""

    name: str
    stream: str
    mode: str  # "long-poll" | "sse"
    received: list[str] = field(default_factory=list)
    reconnects: int = 0
    stalls: int = 0
    errors: int = 0


@dataclass
class FaultEvent:
    """One injected fault and how long the shard stayed unavailable afterwards."""

    shard: str
    kind: str  # "kill" | "stop" | "supervisor-kill" (shard: "supervisor")
    at: float  # seconds since the run started
    pid: int
    duration: float = 0.0  # how long a stop lasted
    recovered_after: float | None = None  # first successful write started after the fault
    # a kill: when the supervisor started the successor; a supervisor kill: when the new
    # supervisor was ready
    respawned_after: float | None = None
    # the shard left the ring (a scale down) before it served a write again: nothing of
    # it is left to be unavailable
    left_ring: bool = False


@dataclass(frozen=True)
class Violation:
    kind: str  # lost | duplicated | reordered | phantom | partial | corrupt | reader-* | ...
    stream: str
    detail: str


@dataclass
class Stats:
    acked_batches: int = 0
    acked_messages: int = 0
    duplicates_acked: int = 0  # 204 answers: the retry found its write already stored
    retries: int = 0
    rejected: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    forks_created: int = 0
    # seconds from a batch's first attempt to its acknowledgement, retries included
    write_latencies: list[float] = field(default_factory=list)
    longest_write_by_stream: dict[str, float] = field(default_factory=dict)

    def count_status(self, key: str) -> None:
        self.status_counts[key] = self.status_counts.get(key, 0) + 1

    def client_errors(self) -> dict[str, int]:
        """Answers in 400-499 that writers or readers got (the status counts' 4xx)."""
        return {k: n for k, n in self.status_counts.items() if k.split()[-1].startswith("4")}
