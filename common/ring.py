"""The placement ring: which shard owns which stream path.

The ring is data, not code: a version number and a list of shard ids. Everyone who
routes (the gateway, a shard forwarding a fork RPC) builds the same ring from the same
list, so placement agrees without coordination. A new shard list gets a new version;
RPC messages carry the version so a shard can tell a caller routing on a stale ring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uhashring import HashRing

from ds_cluster.common.wire import RingInfo

OWNER_CACHE_SIZE = 100_000  # paths whose owner is remembered (hashing costs ~10 us)


@dataclass(frozen=True)
class Ring:
    """A versioned list of shard ids with consistent-hash placement over them."""

    version: int
    shard_ids: tuple[str, ...]
    _ring: HashRing = field(init=False, repr=False, compare=False)
    # path -> owner, remembered (a ring never changes) and cleared when it grows too big
    _owners: dict[str, str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shard_ids:
            raise ValueError("a ring needs at least one shard")
        if len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError("shard ids must be unique")
        ids = tuple(sorted(self.shard_ids))
        object.__setattr__(self, "shard_ids", ids)
        object.__setattr__(self, "_ring", HashRing(nodes=list(ids)))

    def owner(self, path: str) -> str:
        """The id of the shard that owns the stream at `path` (path without the URL prefix)."""
        if len(self.shard_ids) == 1:
            return self.shard_ids[0]
        owners = self._owners
        owner = owners.get(path)
        if owner is None:
            if len(owners) >= OWNER_CACHE_SIZE:
                owners.clear()
            owner = owners[path] = self._ring.get_node(path)
        return owner

    def owns(self, shard_id: str, path: str) -> bool:
        return self.owner(path) == shard_id

    def to_wire(self) -> RingInfo:
        """The ring as the RPC handshake carries it."""
        return {"version": self.version, "shards": list(self.shard_ids)}


def parse_endpoints(spec: str) -> dict[str, tuple[str, int]]:
    """Parse `ID=HOST:PORT,ID=HOST:PORT` into {id: (host, port)}."""
    endpoints: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        shard_id, sep, address = item.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not shard_id or not host or not port.isdigit():
            raise ValueError(f"bad endpoint {item!r}: expected ID=HOST:PORT")
        if shard_id in endpoints:
            raise ValueError(f"shard id {shard_id!r} given twice")
        endpoints[shard_id] = (host, int(port))
    return endpoints


def parse_listen(spec: str) -> tuple[str, int]:
    host, colon, port = spec.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"bad address {spec!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)
