"""Read-back verification for a load whose writers number their requests per thread.

wrk (`append.lua`) does not tie a response to the request it answers: a thread's
connections share one Lua state, and `response()` only learns a status. So each thread t
numbers its POSTs 0, 1, 2, ... with one counter (q), sends POST q to the stream
`stream_of(t, q)` with a body derived from (stream, t, q), and counts what it sent and
how the answers came: 2xx (`ok`), 4xx (`refused`), anything else (`doubt`). Socket errors
are only known as totals. What can still be proved from that:

- A connection has at most one request in flight, so a thread with W connections has at
  most W. When it numbered POST q_b, every POST q <= q_b - W had been answered.
- Without any error (no non-2xx, no socket error, no timeout), every answer was a 2xx and
  a 2xx means committed. So every POST below `sent - W` is in its stream exactly once;
  only the last W may be missing (still in flight when wrk stopped, committed or not), and
  at least `ok` of the thread's POSTs are there. Within a stream, a POST q_a <= q_b - W of
  the same thread was committed before q_b was sent, so it reads back before q_b.
- With errors, the outcome of some POSTs is unknown and a reconnect can put more than W
  in flight, so only counts hold: at least `ok` and at most `sent - refused` of the
  thread's POSTs are present. The errors fail the run in any case (wrk.py).

In both cases every record must be whole, byte for byte the body it names, in the stream
its number was sent to, from a POST that was sent (q < sent), and present once; a JSON
batch (json10: POST q holds messages 10q .. 10q+9) must read back whole and contiguous.
So loss, duplication, corruption and foreign bodies are caught, and a correct server is
never flagged: each check follows from the two facts above.

With one connection per thread (W = 1) this is the exact per-connection check: every
acknowledged POST present, in send order.
"""

from __future__ import annotations

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
    exact: bool,
) -> list[str]:
    """Problems in `found` (stream -> records as `bodies.records` splits them) given each
    thread's counts; `window` is the connections per thread, `exact` that the run had no
    error of any kind. Empty when the read-back is one a correct server can produce."""
    per_post = 10 if mode == "json10" else 1
    threads = len(counts)
    problems: list[str] = []
    seen: dict[int, dict[int, int]] = {c: {} for c in counts}  # thread -> post -> messages
    messages: set[tuple[int, int]] = set()  # (thread, message) read so far
    for s, recs in found.items():
        highest: dict[int, int] = {}  # thread -> highest post read so far in this stream
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
            seen[c][post] = seen[c].get(post, 0) + 1
            previous = (c, q)
            if j and here != (c, q - 1):
                problems.append(f"stream {s}: batch {post} of thread {c} is not contiguous")
            if exact and highest.get(c, -1) >= post + window:
                problems.append(
                    f"stream {s}: thread {c}'s post {post} reads back after post "
                    f"{highest[c]}, sent when it had been answered"
                )
            highest[c] = max(highest.get(c, -1), post)
    for c, n in counts.items():
        posts = seen[c]
        torn = [p for p, k in posts.items() if k != per_post]
        if torn:
            problems.append(f"thread {c}: {len(torn)} batches read back in part")
        if exact:
            if n.sent - n.ok > window:
                problems.append(f"thread {c}: {n.sent - n.ok} unanswered with {window} connections")
            lost = [p for p in range(n.sent - window) if p not in posts]
            if lost:
                problems.append(f"thread {c}: {len(lost)} acknowledged posts lost, e.g. {lost[0]}")
        if len(posts) < n.ok:
            problems.append(f"thread {c}: {len(posts)} posts read back, {n.ok} acknowledged")
        if len(posts) > n.sent - n.refused:
            problems.append(
                f"thread {c}: {len(posts)} posts read back, {n.refused} of {n.sent} refused"
            )
    return problems


def verify(
    target: Target,
    mode: str,
    names: dict[int, str],
    counts: dict[int, ThreadCounts],
    window: int,
    exact: bool,
) -> dict[str, Any]:
    """Read every stream back and `check` it."""
    with SyncClient(target) as client:
        found = {s: records(mode, client.read_chunks(target.path(n))) for s, n in names.items()}
    problems = check(mode, found, counts, len(names), window, exact)
    return {
        "records_checked": sum(len(r) for r in found.values()),
        "problems": problems[:20],
        "problem_count": len(problems),
    }
