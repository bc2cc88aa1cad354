"""Large catch-up bodies the gateway keeps, so that a hot one does not cross the shard link
again.

Each MB that crosses the loopback link costs a copy in the shard and one in the gateway,
and a catch-up read of a hot stream asks for the same slice over and over. A shard names
each large raw slice it answers with a body token (common/wire.py's `t`; equal tokens,
equal bytes). The gateway keeps the body under what it knows before it asks, the stream
path and the raw query, and sends its token with the next such request: the shard decides
the whole answer as always and leaves the body out only when it is the very one the token
names (`hit`). A stale entry costs only a miss, never a wrong body: the shard, not this
cache, says whether the bytes are still the answer.

Bounded by bytes (least recently used out first); every reader of a body shares one
bytes object, written to its socket uncopied.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_BYTES = 64 * 1024 * 1024  # the gateway's default budget (`--body-cache-bytes`)
MAX_SHARE = 8  # a body over budget / MAX_SHARE is not kept: it would push out the rest

Key = tuple[str, bytes]  # (stream path, raw query)


class BodyCache:
    """(token, body) by `Key`, at most `budget` bytes of bodies (0: keeps nothing)."""

    def __init__(self, budget: int = DEFAULT_BYTES) -> None:
        self._bodies: OrderedDict[Key, tuple[bytes, bytes]] = OrderedDict()
        self._budget = budget
        self._largest = budget // MAX_SHARE
        self.held_bytes = 0
        self.hits = 0  # answers whose body came from here
        self.misses = 0  # answers to a token sent whose body came from the shard

    @property
    def enabled(self) -> bool:
        return self._budget > 0

    def get(self, key: Key) -> tuple[bytes, bytes] | None:
        """The (token, body) kept for `key`, if any."""
        held = self._bodies.get(key)
        if held is not None:
            self._bodies.move_to_end(key)
        return held

    def put(self, key: Key, token: bytes, body: bytes) -> None:
        """Keep `body`, which the shard named `token`, for `key` (replacing what it held)."""
        size = len(body)
        if size > self._largest or not token:
            return
        bodies = self._bodies
        old = bodies.pop(key, None)
        if old is not None:
            self.held_bytes -= len(old[1])
        bodies[key] = (token, body)
        self.held_bytes += size
        while self.held_bytes > self._budget:
            _, (_, dropped) = bodies.popitem(last=False)
            self.held_bytes -= len(dropped)

    def drop(self, key: Key) -> None:
        """Forget `key` (its body is no longer the answer)."""
        old = self._bodies.pop(key, None)
        if old is not None:
            self.held_bytes -= len(old[1])

    def __len__(self) -> int:
        return len(self._bodies)
