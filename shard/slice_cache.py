"""Recently read slices of streams' raw data, so that a hot catch-up costs no SQLite read.

A catch-up read of 1 MiB from disk steps SQLite through its rows, copies each out and
joins them: about half of a shard's CPU under many readers of the same streams. What a
read returns below the committed tail never changes for one incarnation of a stream, so
the joined slice can be served again from memory, if the key says exactly which data it is:

  * the entry's `incarnation` (`streams.Entry`): a fresh number for every entry object and
    again whenever the committer drops or replaces the stream's data (`Entry.forget`: a
    delete, an expiry, a re-creation, a stream moving away), numbers never reused in the
    process; and the stream id, position and size asked for;
  * the tail the slice was read below: a slice cut short by it (not by the size asked
    for) serves only reads below the same tail, since a later tail has more to give.

The cache holds at most CACHE_BYTES, least recently used out first.

The same key names a slice's bytes to a gateway, as a body token (`body_token`), so that a
gateway holding a slice need not be sent it again (common/wire.py's `t` and `hit`). Equal
tokens must mean equal bytes, in this process and across restarts:

  * a per-process random nonce, since incarnation and stream id numbers restart with the
    process (and a database may be replaced while it is down);
  * the store's generation (`Store.generation`), renewed whenever the database is
    (re)opened, so nothing named before a storage failure matches after it;
  * the incarnation: a delete, expiry, re-creation or move renews it (see above), as does
    a stream coming back after it moved away (a new entry);
  * the stream id, position and size asked for, and the slice's length: below the
    committed tail an incarnation's bytes never change, so a position and a length name
    them; a tail that moved gives a longer slice, hence another token.

A fork's records below its divergence come from its source (the full read path) and get
no token.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict

from ds_cluster.shard.core.model import Record

CACHE_BYTES = 32 * 1024 * 1024  # slices held in all, per shard
MIN_SLICE_BYTES = 64 * 1024  # smaller slices are cheap to read again; live readers use Entry.recent
MAX_SLICE_BYTES = 8 * 1024 * 1024  # a larger one (one huge record) would push out all the rest

SliceKey = tuple[int, int, int, int]  # (entry incarnation, sid, position, max_bytes)

_NONCE = os.urandom(8)  # this process's: see the module's docstring
_TOKEN = struct.Struct(">8s6Q")  # nonce, generation, incarnation, sid, position, max_bytes, length
TOKEN_BYTES = _TOKEN.size  # 56, within wire.MAX_TOKEN_BYTES


def body_token(generation: int, key: SliceKey, length: int) -> bytes:
    """The token of the `length` bytes read for `key` from the store of `generation`."""
    return _TOKEN.pack(_NONCE, generation, *key, length)


class SliceCache:
    """Joined slices by `SliceKey`, each with the tail it was read below."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self._slices: OrderedDict[SliceKey, tuple[int, Record]] = OrderedDict()
        self._bytes = 0
        self._budget = budget

    def get(self, key: SliceKey, below: int) -> Record | None:
        """The slice read for `key`, if it is what a read below `below` returns now."""
        held = self._slices.get(key)
        if held is None:
            return None
        read_below, record = held
        if read_below != below and len(record.data) < key[3]:
            return None  # cut by the tail it was read below, and the tail has moved
        self._slices.move_to_end(key)
        return record

    def put(self, key: SliceKey, below: int, record: Record) -> None:
        """Keep `record`, read from disk for `key` below `below`."""
        size = len(record.data)
        if not MIN_SLICE_BYTES <= size <= MAX_SLICE_BYTES:
            return
        slices = self._slices
        old = slices.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1].data)
        slices[key] = (below, record)
        self._bytes += size
        while self._bytes > self._budget:
            _, (_, dropped) = slices.popitem(last=False)
            self._bytes -= len(dropped.data)

    @property
    def held_bytes(self) -> int:
        return self._bytes
