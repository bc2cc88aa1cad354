"""Interpreter settings for a serving process (a shard, a gateway): the cycle collector,
and how soon a waiting thread gets the GIL.

Every request allocates a few hundred short-lived container objects (frames, tasks,
dicts, lists). At CPython's default young-generation threshold (700 allocations) the
cycle collector ran every few requests and took about a sixth of a shard's event-loop
time under an append load. The heap built at start-up (modules, the ring, the store's
statements) lives as long as the process: frozen, no collection traverses it again, and
the young generation is collected less often. Cyclic garbage is still collected.

A shard commits large groups in a worker thread while its event loop serves the next
requests. SQLite lets go of the GIL around each statement, and a busy loop then keeps it
for CPython's whole switch interval (5 ms) before the commit thread may go on: a group
commit of a few dozen statements took many milliseconds of waiting, and every append of
the group waited with it. At 0.5 ms the default cluster took 22-27% more appends/s at
less CPU per append (alternated runs, 64 connections); 0.1 ms was no better.
"""

from __future__ import annotations

import gc
import sys

YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)
SWITCH_INTERVAL = 0.0005  # seconds a thread may hold the GIL while another waits (default 5 ms)


def tune_for_serving() -> None:
    """Call once, when start-up is done and the process begins serving."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    sys.setswitchinterval(SWITCH_INTERVAL)
