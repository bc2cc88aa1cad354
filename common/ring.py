"""The placement ring: which shard owns which stream path, and where each shard listens.

The ring is data, not code: a version number, a list of shard ids and (for whoever must
connect to them) each shard's address. Everyone who routes (the gateway, a shard
forwarding a fork RPC) builds the same placement from the same list, so placement agrees
without coordination. A new shard list gets a new, higher version. Every RPC request
carries its caller's ring version, so a shard can tell a caller routing on another ring
and answer with its own (`err version`, see common/wire.py); the newer ring wins.

A process holds the newest ring it has seen in a `RingHolder`: rings arrive on the wire
(`Ring.from_wire`), the holder adopts only strictly newer ones, and tasks that must react
to a change wait for it (`wait_newer`) instead of polling.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio
from uhashring import HashRing

from ds_cluster.common.wire import RingInfo

OWNER_CACHE_SIZE = 100_000  # paths whose owner is remembered (hashing costs ~10 us)
MAX_RING_SHARDS = 4096  # shards a ring from the wire may list
MAX_SHARD_ID = 200  # characters in a shard id (as the handshake allows)
MAX_HOST = 255  # characters in a host name

Endpoint = tuple[str, int]  # (host, port)


@dataclass(frozen=True)
class Ring:
    """A versioned list of shard ids with consistent-hash placement over them, and the
    address of each shard (`endpoints`; may be empty where only placement matters)."""

    version: int
    shard_ids: tuple[str, ...]
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict, hash=False)
    _ring: HashRing = field(init=False, repr=False, compare=False)
    # path -> owner, remembered (a ring never changes) and cleared when it grows too big;
    # a router may look a path up here before calling `owner` (one call fewer per request)
    owners: dict[str, str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shard_ids:
            raise ValueError("a ring needs at least one shard")
        if len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError("shard ids must be unique")
        if type(self.version) is not int or self.version < 0:
            raise ValueError(f"bad ring version {self.version!r}")
        ids = tuple(sorted(self.shard_ids))
        unknown = set(self.endpoints) - set(ids)
        if unknown:
            raise ValueError(f"endpoints for shards not in the ring: {sorted(unknown)}")
        object.__setattr__(self, "shard_ids", ids)
        object.__setattr__(self, "endpoints", types.MappingProxyType(dict(self.endpoints)))
        object.__setattr__(self, "_ring", HashRing(nodes=list(ids)))

    def owner(self, path: str) -> str:
        """The id of the shard that owns the stream at `path` (path without the URL prefix)."""
        if len(self.shard_ids) == 1:
            return self.shard_ids[0]
        owners = self.owners
        owner = owners.get(path)
        if owner is None:
            if len(owners) >= OWNER_CACHE_SIZE:
                owners.clear()
            owner = owners[path] = self._ring.get_node(path)
        return owner

    def owns(self, shard_id: str, path: str) -> bool:
        return self.owner(path) == shard_id

    def with_endpoints(self, endpoints: Mapping[str, Endpoint]) -> Ring:
        """The same ring with `endpoints` (those of shards in the ring) added."""
        merged = {**self.endpoints, **{k: v for k, v in endpoints.items() if k in self.shard_ids}}
        return Ring(self.version, self.shard_ids, merged)

    def to_wire(self) -> RingInfo:
        """The ring as RPC frames carry it (the handshake's `ready`, `err` answers)."""
        return {
            "version": self.version,
            "shards": list(self.shard_ids),
            "endpoints": {sid: format_endpoint(ep) for sid, ep in self.endpoints.items()},
        }

    @classmethod
    def from_wire(cls, info: object) -> Ring:
        """The ring a peer sent (a RingInfo), checked field by field; ValueError if it is
        not one. A ring from the wire decides where requests go: nothing is taken on trust."""
        if type(info) is not dict:
            raise ValueError("ring is not a map")
        version, shards = info.get("version"), info.get("shards")
        endpoints = info.get("endpoints", {})
        if type(version) is not int or version < 0:
            raise ValueError("ring version is not a non-negative integer")
        if type(shards) is not list or not 0 < len(shards) <= MAX_RING_SHARDS:
            raise ValueError(f"ring shards is not a list of 1 to {MAX_RING_SHARDS} ids")
        if not all(type(sid) is str and 0 < len(sid) <= MAX_SHARD_ID for sid in shards):
            raise ValueError("ring shard id is not a short string")
        if type(endpoints) is not dict:
            raise ValueError("ring endpoints is not a map")
        parsed: dict[str, Endpoint] = {}
        for sid, address in endpoints.items():
            if type(sid) is not str or type(address) is not str:
                raise ValueError("ring endpoint is not id -> 'host:port'")
            parsed[sid] = parse_listen(address, default_host=None)
        return cls(version, tuple(shards), parsed)


class RingHolder:
    """The newest ring this process has seen. Rings only move forward: `adopt` takes a
    ring only when its version is strictly higher, and wakes every `wait_newer`."""

    def __init__(self, ring: Ring) -> None:
        # Read only, changed by `adopt`: plain attributes, since every request reads
        # them and Python 3.11 calls a property as a function.
        self.current = ring
        self.version = ring.version
        self._changed = trio.Event()

    def adopt(self, ring: Ring) -> bool:
        """Take `ring` if it is newer than the current one; True if it was taken."""
        if ring.version <= self.version:
            return False
        self.current = ring
        self.version = ring.version
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        return True

    async def wait_newer(self, version: int) -> Ring:
        """The current ring, once its version is above `version` (at once if it is)."""
        while self.version <= version:
            await self._changed.wait()
        return self.current


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(spec: str) -> dict[str, Endpoint]:
    """Parse `ID=HOST:PORT,ID=HOST:PORT` into {id: (host, port)}."""
    endpoints: dict[str, Endpoint] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        shard_id, sep, address = item.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not shard_id or not host or not port.isdigit():
            raise ValueError(f"bad endpoint {item!r}: expected ID=HOST:PORT")
        if shard_id in endpoints:
            raise ValueError(f"shard id {shard_id!r} given twice")
        endpoints[shard_id] = (_unbracket(host), int(port))
    return endpoints


def parse_listen(spec: str, default_host: str | None = "127.0.0.1") -> Endpoint:
    """`HOST:PORT` (an IPv6 host may be bracketed) as (host, port). An empty host is
    `default_host`, or refused when that is None."""
    host, colon, port = spec.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535 or len(host) > MAX_HOST:
        raise ValueError(f"bad address {spec!r}: expected HOST:PORT")
    host = _unbracket(host)
    if not host:
        if default_host is None:
            raise ValueError(f"bad address {spec!r}: no host")
        host = default_host
    return host, int(port)


def _unbracket(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host
