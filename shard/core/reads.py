"""Assembling read responses from records: slicing, ETags, cache headers.

Shared by catch-up/long-poll reads (`protocol.finish_read`) and SSE (`sse.SseSession`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from . import jsonmode
from .model import Record, StreamState

CACHE_PUBLIC = ("cache-control", "public, max-age=60, stale-while-revalidate=300")
NO_STORE = ("cache-control", "no-store")
UP_TO_DATE = ("stream-up-to-date", "true")
CLOSED = ("stream-closed", "true")


def collect(
    records: Iterable[Record], position: int, limit: int, json_mode: bool
) -> tuple[list[bytes], int]:
    """The data slices covering [position, end) and `end`, from records in order.

    Records wholly before `position` are skipped, one straddling it is sliced (a client
    offset may fall inside a record, e.g. a fork sub-offset), nothing at or past `limit`
    (the committed tail the response describes) is used, and a gap stops the run."""
    parts: list[bytes] = []
    end = position
    for r in records:
        start, stop = r.start, r.end
        if stop <= end:
            continue
        if start > end or start >= limit:
            break
        data = r.data
        if stop > limit:  # defensive: never describe data past the state's tail
            data = (
                jsonmode.head(data, limit - start, stop - start)
                if json_mode
                else data[: limit - start]
            )
            stop = limit
        if start < end:
            data = jsonmode.tail(data, end - start) if json_mode else data[end - start :]
        parts.append(data)
        end = stop
    return parts, end


def stream_id(state: StreamState) -> str:
    """Identity of one incarnation of a stream (a path re-created later gets a new one)."""
    return format(int(state.created_at * 1_000_000), "x")


def etag(state: StreamState, start: int, end: int, closed: bool) -> str:
    """`"{id}:{start}:{end}"`, plus `:c` once the response carries the closure signal, so a
    close without new data never yields a 304 that hides EOF (10.1)."""
    return f'"{stream_id(state)}:{start}:{end}{":c" if closed else ""}"'


def if_none_match(headers: Mapping[str, str], tag: str) -> bool:
    """Whether the request's If-None-Match names `tag` (weak comparison, lists, `*`)."""
    value = headers.get("if-none-match")
    if value is None:
        return False
    if value == tag:
        return True
    for candidate in value.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == tag or candidate == "*":
            return True
    return False
