"""Hot-path cost of the core: a generous regression guard, and numbers for `-s` runs.

Run `pytest tests/unit/test_core_perf.py -s` to print per-request timings. The bound is
loose (the CI box is shared) and only catches order-of-magnitude regressions.
"""

import json
import timeit

from ds_cluster.shard import core
from ds_cluster.shard.core import CoreConfig, Record, Request, offsets

NOW = 1_800_000_000.0
CFG = CoreConfig()


def _setup():
    st = core.handle(Request("PUT", "a", "", {"content-type": "text/plain"}), None, NOW, CFG).state
    jst = core.handle(
        Request("PUT", "j", "", {"content-type": "application/json"}), None, NOW, CFG
    ).state
    body = b"x" * 100
    recs = [Record(i * 100, (i + 1) * 100, body) for i in range(10)]
    st10 = core.model.evolve(st, tail=1000)
    producer = {"producer-id": "p", "producer-epoch": "0", "producer-seq": "0"}
    event = json.dumps({"event": "created", "id": 123, "payload": "x" * 50}).encode()
    batch = json.dumps([{"i": i, "v": "x" * 20} for i in range(100)]).encode()
    append = Request("POST", "a", "", {"content-type": "text/plain"}, body)
    append_p = Request("POST", "a", "", {"content-type": "text/plain", **producer}, body)
    append_j = Request("POST", "j", "", {"content-type": "application/json"}, event)
    append_jb = Request("POST", "j", "", {"content-type": "application/json"}, batch)
    read = Request("GET", "a", "offset=-1", {})
    poll = Request("GET", "a", f"offset={offsets.encode(1000)}&live=long-poll", {})
    head = Request("HEAD", "a", "", {})

    def do_read():
        core.handle(read, st10, NOW, CFG)
        return core.finish_read(read, st10, recs, NOW, CFG)

    return {
        "append 100 B (binary)": lambda: core.handle(append, st, NOW, CFG),
        "append 100 B + producer headers": lambda: core.handle(append_p, st, NOW, CFG),
        "append one JSON object": lambda: core.handle(append_j, jst, NOW, CFG),
        "append JSON batch of 100": lambda: core.handle(append_jb, jst, NOW, CFG),
        "catch-up read, 10 records (handle + finish_read)": do_read,
        "long-poll at tail -> Wait": lambda: core.handle(poll, st10, NOW, CFG),
        "HEAD": lambda: core.handle(head, st10, NOW, CFG),
    }


def test_core_hot_path_cost():
    for name, fn in _setup().items():
        n = 500
        per_call = min(timeit.repeat(fn, number=n, repeat=3)) / n
        print(f"{name:50s} {per_call * 1e6:8.1f} us")
        assert per_call < 2e-3, name
