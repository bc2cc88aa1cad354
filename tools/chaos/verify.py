"""Verification of a chaos run: pure functions over what writers, readers and the final
catch-up read recorded.

A stream's final content must be its inherited prefix (forks) followed by exactly the
acknowledged batches of its writers: each acknowledged id present exactly once, each
writer's ids in the order it sent them, nothing a writer did not send, no batch split.
A batch still in flight when the run stopped may be present or absent, but whole.
Every live reader must have seen a prefix of the final content: no gap, no duplicate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .model import ReaderLog, StreamPlan, Violation, WriterLedger
from .payload import writer_of


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    phantom: int = 0
    partial: int = 0
    reader_errors: int = 0

    def add(self, kind: str, stream: str, detail: str) -> None:
        self.violations.append(Violation(kind, stream, detail))


def _sample(ids: list[str], limit: int = 5) -> str:
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def verify_stream(
    plan: StreamPlan, final: list[str], ledgers: list[WriterLedger], verdict: Verdict
) -> None:
    path = plan.path
    prefix = plan.prefix
    if final[: len(prefix)] != prefix:
        index = next(
            (i for i, (a, b) in enumerate(zip(final, prefix, strict=False)) if a != b),
            min(len(final), len(prefix)),
        )
        verdict.add(
            "fork-prefix",
            path,
            f"inherited data differs from the source at message {index} "
            f"(fork has {len(final)} messages, expected prefix of {len(prefix)})",
        )
    rest = final[len(prefix) :]
    counts = Counter(rest)
    extra = {mid: n - 1 for mid, n in counts.items() if n > 1}
    if extra:
        verdict.duplicated += sum(extra.values())
        verdict.add(
            "duplicated", path, f"{sum(extra.values())} extra copies: {_sample(list(extra))}"
        )
    by_writer: dict[str, list[str]] = {}
    for mid in rest:
        by_writer.setdefault(writer_of(mid), []).append(mid)
    mine = {ledger.name for ledger in ledgers}
    strangers = [mid for name, ids in by_writer.items() if name not in mine for mid in ids]
    if strangers:
        verdict.phantom += len(strangers)
        verdict.add(
            "phantom", path, f"messages no writer of this stream sent: {_sample(strangers)}"
        )
    for ledger in ledgers:
        _verify_writer(path, ledger, by_writer.get(ledger.name, []), counts, verdict)


def _verify_writer(
    path: str, ledger: WriterLedger, seen: list[str], counts: Counter, verdict: Verdict
) -> None:
    acked = ledger.acked_ids()
    pending = ledger.pending or []
    lost = [mid for mid in acked if counts[mid] == 0]
    if lost:
        verdict.lost += len(lost)
        verdict.add("lost", path, f"{ledger.name}: {len(lost)} acknowledged: {_sample(lost)}")
    present_pending = [mid for mid in pending if counts[mid]]
    if present_pending and len(present_pending) != len(pending):
        verdict.partial += 1
        verdict.add("partial", path, f"{ledger.name}: in-flight batch stored in part: {pending}")
    rejected = {mid for batch in ledger.rejected for mid in batch}
    known = set(acked) | set(pending)
    unknown = [mid for mid in dict.fromkeys(seen) if mid not in known or mid in rejected]
    if unknown:
        verdict.phantom += len(unknown)
        verdict.add("phantom", path, f"{ledger.name}: never acknowledged: {_sample(unknown)}")
    expected = [mid for mid in acked + pending if counts[mid]]
    got = [mid for mid in dict.fromkeys(seen) if mid in known]
    if got != expected:
        index = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        verdict.reordered += 1
        verdict.add(
            "reordered",
            path,
            f"{ledger.name}: order differs at its message {index}: "
            f"stored {got[index : index + 3]}, sent {expected[index : index + 3]}",
        )


def verify_reader(log: ReaderLog, final: list[str], complete: bool, verdict: Verdict) -> None:
    """`complete`: the reader was given time to catch up, so it must hold everything."""
    received = log.received
    if received != final[: len(received)]:
        index = next(
            (i for i, (a, b) in enumerate(zip(received, final, strict=False)) if a != b),
            min(len(received), len(final)),
        )
        what = (
            "duplicate"
            if received[index : index + 1] and received[index] in received[:index]
            else "gap"
        )
        verdict.reader_errors += 1
        verdict.add(
            f"reader-{what}",
            log.stream,
            f"{log.name} ({log.mode}) diverges at message {index}: "
            f"saw {received[index : index + 2]}, stream has {final[index : index + 2]}",
        )
    elif complete and len(received) < len(final):
        verdict.reader_errors += 1
        verdict.add(
            "reader-behind",
            log.stream,
            f"{log.name} ({log.mode}) saw {len(received)} of {len(final)} messages",
        )


def verify(
    plans: list[StreamPlan],
    finals: dict[str, list[str]],
    ledgers: list[WriterLedger],
    readers: list[ReaderLog],
    *,
    readers_complete: bool = True,
) -> Verdict:
    verdict = Verdict()
    for plan in plans:
        if not plan.created:
            continue
        final = finals.get(plan.path)
        if final is None:
            verdict.add("unreadable", plan.path, "the final catch-up read did not succeed")
            continue
        verify_stream(plan, final, [w for w in ledgers if w.stream == plan.path], verdict)
    for log in readers:
        final = finals.get(log.stream)
        if final is not None:
            verify_reader(log, final, readers_complete, verdict)
    return verdict
