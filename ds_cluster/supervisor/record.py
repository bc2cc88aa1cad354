"""`DATA/cluster.json`: which cluster a data dir holds, and the scale under way, if any.

The record is the supervisor's memory across runs:

    {"shards": ["shard-0", "shard-1"], "ring_version": 3,
     "ports": {"shard-0": 23001, "shard-1": 23002},
     "scale": {"shards": ["shard-0", "shard-1", "shard-2"], "ring_version": 4}}

`shards` and `ring_version` are the ring the cluster serves on; `ports` keeps each shard
on the same address across runs, because a ring names its shards' addresses and shards
remember their ring. `scale`, when present, is the journal of a change of shard count
that has not finished: the ring being moved to. A supervisor that dies mid-scale leaves
it behind, and the next `ds-cluster up` finishes the move before anything else.

Written atomically (temporary file, fsync, rename, fsync of the directory), so a crash
leaves the old record or the new one, never a torn one. The first format held only
`{"shards": N}`; it reads as shards `shard-0` .. `shard-{N-1}` on ring version 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

RECORD_NAME = "cluster.json"
MAX_SHARDS = 256  # a local cluster larger than this is a typo


class RecordError(Exception):
    """The record is unreadable or describes no valid cluster."""


def shard_ids(count: int) -> tuple[str, ...]:
    """The ids of a cluster of `count` shards: a function of the count alone."""
    return tuple(f"shard-{k}" for k in range(count))


@dataclass(frozen=True)
class ScaleJournal:
    """A scale under way: the ring the cluster is moving to."""

    shards: tuple[str, ...]
    ring_version: int


@dataclass(frozen=True)
class ClusterRecord:
    shards: tuple[str, ...]
    ring_version: int = 1
    ports: dict[str, int] = field(default_factory=dict)
    scale: ScaleJournal | None = None

    @property
    def running_shards(self) -> tuple[str, ...]:
        """Every shard that must run: the serving set, plus (mid-scale) the target set,
        because a leaving shard still holds streams to hand over."""
        target = self.scale.shards if self.scale else ()
        return tuple(sorted(set(self.shards) | set(target), key=shard_order))

    @property
    def newest_version(self) -> int:
        return max(self.ring_version, self.scale.ring_version if self.scale else 0)

    def begin_scale(self, target: tuple[str, ...], ports: dict[str, int]) -> ClusterRecord:
        """The record with a journal for a move to `target` on a new ring version."""
        return replace(
            self,
            ports={**self.ports, **ports},
            scale=ScaleJournal(target, self.newest_version + 1),
        )

    def finish_scale(self) -> ClusterRecord:
        """The record once the cluster serves entirely on the journal's ring."""
        assert self.scale is not None
        kept = self.scale.shards
        return ClusterRecord(
            shards=kept,
            ring_version=self.scale.ring_version,
            ports={sid: port for sid, port in self.ports.items() if sid in kept},
            scale=None,
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "shards": list(self.shards),
            "ring_version": self.ring_version,
            "ports": dict(self.ports),
        }
        if self.scale is not None:
            out["scale"] = {
                "shards": list(self.scale.shards),
                "ring_version": self.scale.ring_version,
            }
        return out

    @classmethod
    def from_json(cls, data: object) -> ClusterRecord:
        """Parse and check a record; RecordError naming what is wrong."""
        if type(data) is not dict:
            raise RecordError("not a JSON object")
        shards = data.get("shards")
        if type(shards) is int:  # the first format: {"shards": N}
            return cls(_ids_of_count(shards))
        ids = _ids(shards, "shards")
        version = _version(data.get("ring_version", 1), "ring_version")
        ports = data.get("ports", {})
        if type(ports) is not dict or not all(
            type(k) is str and type(v) is int and 0 < v < 65536 for k, v in ports.items()
        ):
            raise RecordError("ports is not a map of shard id -> port")
        scale = data.get("scale")
        journal = None
        if scale is not None:
            if type(scale) is not dict:
                raise RecordError("scale is not a JSON object")
            journal = ScaleJournal(
                _ids(scale.get("shards"), "scale.shards"),
                _version(scale.get("ring_version"), "scale.ring_version"),
            )
            if journal.ring_version <= version:
                raise RecordError("scale.ring_version is not above ring_version")
        return cls(ids, version, dict(ports), journal)


def load(data_dir: Path) -> ClusterRecord | None:
    """The data dir's record, or None for a dir that holds no cluster yet."""
    path = data_dir / RECORD_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RecordError(f"{path}: {exc.strerror}") from None
    try:
        return ClusterRecord.from_json(json.loads(text))
    except (ValueError, RecordError) as exc:
        raise RecordError(f"{path} is unreadable: {exc}") from None


def save(data_dir: Path, record: ClusterRecord) -> None:
    """Replace the record atomically and durably."""
    path = data_dir / RECORD_NAME
    tmp = path.with_name(f".{RECORD_NAME}.tmp")
    data = (json.dumps(record.to_json(), indent=1) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def shard_order(shard_id: str) -> tuple[int, str]:
    """shard-2 before shard-10."""
    _, _, number = shard_id.rpartition("-")
    return (int(number) if number.isdigit() else 1 << 30, shard_id)


def _ids_of_count(count: object) -> tuple[str, ...]:
    if type(count) is not int or not 1 <= count <= MAX_SHARDS:
        raise RecordError(f"shards is not a count of 1 to {MAX_SHARDS}")
    return shard_ids(count)


def _ids(value: object, name: str) -> tuple[str, ...]:
    if (
        type(value) is not list
        or not 1 <= len(value) <= MAX_SHARDS
        or not all(type(sid) is str and sid for sid in value)
        or len(set(value)) != len(value)
    ):
        raise RecordError(f"{name} is not a list of 1 to {MAX_SHARDS} distinct shard ids")
    return tuple(sorted(value, key=shard_order))


def _version(value: object, name: str) -> int:
    if type(value) is not int or value < 1:
        raise RecordError(f"{name} is not a positive integer")
    return value
