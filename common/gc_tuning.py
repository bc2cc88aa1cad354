"""Cycle-collector settings for a serving process (a shard, a gateway).

Every request allocates a few hundred short-lived container objects (frames, tasks,
dicts, lists). At CPython's default young-generation threshold (700 allocations) the
cycle collector ran every few requests and took about a sixth of a shard's event-loop
time under an append load. The heap built at start-up (modules, the ring, the store's
statements) lives as long as the process: frozen, no collection traverses it again, and
the young generation is collected less often. Cyclic garbage is still collected.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def tune_for_serving() -> None:
    """Call once, when start-up is done and the process begins serving."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
