"""What this shard must notify about: the registrations of subscriptions (owned anywhere)
whose pattern or explicit links may name streams on this shard.

`matches(path)` is on every write's path, so it is indexed: patterns by their literal
first segment (those starting with a wildcard are checked for every path), explicit
links by path, and answers are cached per path until the registrations change.
"""

from __future__ import annotations

from collections import OrderedDict

from ds_cluster.shard.core.subscriptions import first_segment, glob_match

CACHE_PATHS = 10_000
_NONE: frozenset[str] = frozenset()


class Registry:
    def __init__(self) -> None:
        self._patterns: dict[str, str] = {}  # sub id -> pattern
        self._by_first: dict[str, set[str]] = {}  # literal first segment -> sub ids
        self._wild: set[str] = set()  # sub ids whose pattern starts with a wildcard
        self._explicit: dict[str, set[str]] = {}  # path -> sub ids
        self._cache: OrderedDict[str, frozenset[str]] = OrderedDict()
        # No registration at all (most shards): what `matches` answers first, read as an
        # attribute by the notifier on every append instead of a call (about 600
        # instructions per append).
        self.empty = True

    def __len__(self) -> int:
        return len(self._patterns) + sum(map(len, self._explicit.values()))

    def add(self, sub_id: str, kind: str, value: str) -> None:
        self._cache.clear()
        self.empty = False
        if kind == "explicit":
            self._explicit.setdefault(value, set()).add(sub_id)
            return
        self._drop_pattern(sub_id)
        self._patterns[sub_id] = value
        first = first_segment(value)
        if first is None:
            self._wild.add(sub_id)
        else:
            self._by_first.setdefault(first, set()).add(sub_id)

    def remove(self, sub_id: str, paths: list[str] | None = None) -> None:
        """Forget `sub_id` (only its explicit links to `paths` if given)."""
        self._cache.clear()
        targets = list(self._explicit) if paths is None else paths
        for path in targets:
            subs = self._explicit.get(path)
            if subs is not None:
                subs.discard(sub_id)
                if not subs:
                    del self._explicit[path]
        if paths is None:
            self._drop_pattern(sub_id)
        self.empty = not self._patterns and not self._explicit

    def _drop_pattern(self, sub_id: str) -> None:
        pattern = self._patterns.pop(sub_id, None)
        if pattern is None:
            return
        self._wild.discard(sub_id)
        first = first_segment(pattern)
        if first is not None and first in self._by_first:
            self._by_first[first].discard(sub_id)
            if not self._by_first[first]:
                del self._by_first[first]

    def matches(self, path: str) -> frozenset[str]:
        """The subscriptions to notify about a write to `path`."""
        if self.empty:
            return _NONE
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        found = set(self._explicit.get(path, ()))
        first = path.partition("/")[0]
        for sub_id in (*self._by_first.get(first, ()), *self._wild):
            if glob_match(self._patterns[sub_id], path):
                found.add(sub_id)
        result = frozenset(found) if found else _NONE
        self._cache[path] = result
        if len(self._cache) > CACHE_PATHS:
            self._cache.popitem(last=False)
        return result
