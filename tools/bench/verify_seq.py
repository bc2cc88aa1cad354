"""Read-back verification for a load whose writers number their requests per thread.

wrk (`append.lua`) does not tie a response to the request it answers: a thread's
connections share one Lua state, and `response()` only learns a status. So each thread t
numbers its POSTs 0, 1, 2, ... with one counter, sends POST q to the stream
`stream_of(t, q)` with a body derived from (stream, t, q), and counts what it sent and
how the answers came: 2xx (`ok`), 4xx (`refused`), anything else (`doubt`). Socket errors
are only known as totals. What can still be proved from that:

- Always: every record is whole, byte for byte the body it names, in the stream its number
  was sent to, from a POST that was sent (q < sent), and present once; a JSON batch
  (json10: POST q holds messages 10q .. 10q+9) reads back whole and contiguous. At least
  `ok` of the thread's POSTs are present (each 2xx committed one), at most
  `sent - refused`. This catches loss, duplication, corruption and foreign bodies; a lost
  acknowledged POST can only hide behind one committed but still unanswered when wrk
  stopped (at most W, the thread's connections).
- Without any error (no non-2xx, no socket error, no timeout), also the order, as far as
  it is known. A connection has at most one request in flight, so a thread has at most W.
  An earlier POST q_a that reads back after q_b in their stream was committed after q_b,
  so it was unanswered when q_b was sent; so was every POST that is absent (every answer
  was a 2xx, so an absent POST was never answered). Those, with q_b itself, are at most W.
  Nothing sharper holds: one slow connection can hold an early POST while the others send
  hundreds (seen with rakaia), so "everything W or more below q_b was answered" is false.
  Also sent - ok <= W: the unanswered are the ones in flight at the end.
- With errors, a reconnect can leave more than W in flight, so only the first part holds;
  the errors fail the run in any case (wrk.py).

Each check follows from those facts, so a correct server is never flagged. With one
connection per thread (W = 1) the order check is the exact one of the Python driver:
every POST before a present one is present, and in send order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from .bodies import expected, records
from .http import SyncClient, Target


@dataclass(frozen=True)
class ThreadCounts:
    """What one load thread sent and how it was answered."""

    sent: int
    ok: int
    refused: int = 0  # 4xx: must be absent
    doubt: int = 0  # other non-2xx: may be present


def owned_streams(thread: int, threads: int, streams: int) -> list[int]:
    """The streams a thread writes, in its round-robin order (append.lua's `owned`)."""
    return list(range(thread, streams, threads)) or [thread % streams]


def stream_of(thread: int, threads: int, streams: int, q: int) -> int:
    owned = owned_streams(thread, threads, streams)
    return owned[q % len(owned)]


def check(
    mode: str,
    found: dict[int, list[Any]],
    counts: dict[int, ThreadCounts],
    streams: int,
    window: int,
    clean: bool,
) -> list[str]:
    """Problems in `found` (stream -> records as `bodies.records` splits them) given each
    thread's counts; `window` is the connections per thread, `clean` that the run had no
    error of any kind. Empty when the read-back is one a correct server can produce."""
    per_post = 10 if mode == "json10" else 1
    threads = len(counts)
    problems: list[str] = []
    seen: dict[int, dict[int, int]] = {c: {} for c in counts}  # thread -> post -> messages
    messages: set[tuple[int, int]] = set()  # (thread, message) read so far
    read_order: dict[tuple[int, int], list[int]] = {}  # (stream, thread) -> posts as read
    for s, recs in found.items():
        previous: tuple[int, int] | None = None  # (thread, message) of the record before
        for rec in recs:
            here, previous = previous, None
            if len(rec) != 4 or rec[0] != s or not isinstance(rec[1], int) or rec[1] not in counts:
                problems.append(f"stream {s}: foreign or broken record {str(rec)[:80]}")
                continue
            _, c, q, payload = rec
            if not isinstance(q, int) or q < 0 or payload != expected(mode, s, c, q):
                problems.append(f"stream {s}: record (c={c}, q={q}) is not the body it names")
                continue
            post, j = divmod(q, per_post)
            if post >= counts[c].sent or stream_of(c, threads, streams, post) != s:
                problems.append(f"stream {s}: record (c={c}, q={q}) was never sent here")
                continue
            if (c, q) in messages:
                problems.append(f"stream {s}: record (c={c}, q={q}) is duplicated")
                continue
            messages.add((c, q))
            previous = (c, q)
            if j and here != (c, q - 1):
                problems.append(f"stream {s}: batch {post} of thread {c} is not contiguous")
            if post not in seen[c]:
                read_order.setdefault((s, c), []).append(post)
            seen[c][post] = seen[c].get(post, 0) + 1
    for c, n in counts.items():
        posts = seen[c]
        torn = [p for p, k in posts.items() if k != per_post]
        if torn:
            problems.append(f"thread {c}: {len(torn)} batches read back in part")
        if len(posts) < n.ok:
            problems.append(f"thread {c}: {len(posts)} posts read back, {n.ok} acknowledged")
        if len(posts) > n.sent - n.refused:
            problems.append(
                f"thread {c}: {len(posts)} posts read back, {n.refused} of {n.sent} refused"
            )
        if clean and n.sent - n.ok > window:
            problems.append(f"thread {c}: {n.sent - n.ok} unanswered with {window} connections")
    if clean:
        absent = {c: [p for p in range(n.sent) if p not in seen[c]] for c, n in counts.items()}
        for (s, c), order in read_order.items():
            problems += _in_flight_beyond(s, c, order, absent[c], window)
    return problems


def _in_flight_beyond(
    s: int, c: int, order: list[int], absent: list[int], window: int
) -> list[str]:
    """Posts of thread c in stream s (`order`: as read back) that would have had more than
    `window` - 1 earlier posts still unanswered when they were sent: the earlier posts that
    read back after them, and those never committed (`absent`, sorted)."""
    later: list[int] = []  # posts read after the current one, sorted
    out: list[str] = []
    for post in reversed(order):
        overtaken = bisect.bisect_left(later, post)
        pending = overtaken + bisect.bisect_left(absent, post)
        if pending >= window:
            out.append(
                f"stream {s}: thread {c}'s post {post} reads back before {overtaken} earlier "
                f"posts, with {pending} earlier posts unanswered and {window} connections"
            )
        bisect.insort(later, post)
    return out


def verify(
    target: Target,
    mode: str,
    names: dict[int, str],
    counts: dict[int, ThreadCounts],
    window: int,
    clean: bool,
) -> dict[str, Any]:
    """Read every stream back and `check` it."""
    with SyncClient(target) as client:
        found = {s: records(mode, client.read_chunks(target.path(n))) for s, n in names.items()}
    problems = check(mode, found, counts, len(names), window, clean)
    return {
        "records_checked": sum(len(r) for r in found.values()),
        "problems": problems[:20],
        "problem_count": len(problems),
    }
