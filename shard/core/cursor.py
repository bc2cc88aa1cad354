"""Stream-Cursor generation (PROTOCOL.md 10.1): CDN collapsing without cache loops."""

from __future__ import annotations

import math
import random

from .model import CoreConfig

_MAX_JITTER_SECONDS = 3600


def current_interval(now: float, config: CoreConfig) -> int:
    return int((now - config.cursor_epoch) // config.cursor_interval)


def next_cursor(client_cursor: str | None, now: float, config: CoreConfig) -> int:
    """The cursor to return: the current interval, or, when the client already holds a
    cursor at or past it, the client's cursor plus 1-3600 s of random jitter, so cursors
    strictly advance and a cached response can never be served back in a loop."""
    interval = current_interval(now, config)
    if client_cursor and client_cursor.isascii() and client_cursor.isdigit():
        client = int(client_cursor)
        if client >= interval:
            jitter = random.randint(1, _MAX_JITTER_SECONDS)
            return client + max(1, math.ceil(jitter / config.cursor_interval))
    return interval
