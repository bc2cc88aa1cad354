"""Jitter for retry delays: many callers that lost the same peer at once must not all come
back at the same instant.

One formula for every retry loop (a shard connection of the RPC client, a shard's fork
releases): the delay is drawn between half of the backoff and all of it, so a loop never
waits longer than its backoff says and never retries in step with the others.
"""

from __future__ import annotations

import random

JITTER_LOW = 0.5  # the shortest delay, as a fraction of the backoff


def jittered(backoff: float) -> float:
    """A delay drawn uniformly from [JITTER_LOW * backoff, backoff]."""
    return backoff * random.uniform(JITTER_LOW, 1.0)
