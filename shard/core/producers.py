"""Idempotent producer validation (PROTOCOL.md 5.2.1), Kafka style.

Pure: the caller folds the accepted `ProducerState` into the new `StreamState`, so the
producer's progress commits in the same transaction as the data it admitted.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import ProtocolError
from .model import ProducerState


def check(
    producers: Mapping[str, ProducerState], pid: str, epoch: int, seq: int
) -> tuple[bool, ProducerState]:
    """Validate `(pid, epoch, seq)` against the stream's producer table.

    Returns `(True, new_state)` for an append to accept, `(False, current_state)` for a
    duplicate (204; `current_state.last_seq` is the highest accepted seq), and raises
    ProtocolError for stale epochs (403), seq gaps (409) and new epochs not starting at 0
    (400)."""
    current = producers.get(pid)
    if current is None:
        if seq != 0:
            raise _gap(0, seq)
        return True, ProducerState(epoch, 0)
    if epoch < current.epoch:
        raise ProtocolError(403, "stale producer epoch", (("producer-epoch", str(current.epoch)),))
    if epoch > current.epoch:
        if seq != 0:
            raise ProtocolError(400, "a new producer epoch must start at Producer-Seq 0")
        return True, ProducerState(epoch, 0)
    if seq <= current.last_seq:
        return False, current
    if seq == current.last_seq + 1:
        return True, ProducerState(epoch, seq)
    raise _gap(current.last_seq + 1, seq)


def _gap(expected: int, received: int) -> ProtocolError:
    return ProtocolError(
        409,
        "producer sequence gap",
        (("producer-expected-seq", str(expected)), ("producer-received-seq", str(received))),
    )
