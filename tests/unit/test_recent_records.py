"""An entry's recent records (`Entry.remember`, `Entry.recent_from`): the committed tail
kept in memory for live readers, whether a write committed one record or several."""

from ds_cluster.shard.core.model import Record
from ds_cluster.shard.streams import RECENT_BYTES, Entry


def _records(start: int, sizes: list[int]) -> tuple[Record, ...]:
    out = []
    for size in sizes:
        out.append(Record(start, start + size, b"x" * size))
        start += size
    return tuple(out)


def test_one_and_several_records_are_counted_alike() -> None:
    one, several = Entry("a"), Entry("b")
    records = _records(0, [10, 20, 30])
    for record in records:
        one.remember((record,))
    several.remember(records)
    assert list(one.recent) == list(several.recent) == list(records)
    assert one.recent_bytes == several.recent_bytes == 60
    assert one.recent_from(15, 1000) == [records[1], records[2]]


def test_a_gap_starts_over() -> None:
    entry = Entry("a")
    entry.remember(_records(0, [10]))
    later = _records(50, [5])
    entry.remember(later)
    assert list(entry.recent) == list(later)
    assert entry.recent_bytes == 5
    assert entry.recent_from(0, 1000) is None  # (memory does not cover it)


def test_the_oldest_go_while_the_rest_hold_the_limit() -> None:
    entry = Entry("a")
    half = RECENT_BYTES // 2
    entry.remember(_records(0, [half, half]))
    entry.remember(_records(2 * half, [1, 2]))  # the rest would hold less: all kept
    assert [r.start for r in entry.recent] == [0, half, 2 * half, 2 * half + 1]
    entry.remember(_records(2 * half + 3, [half]))  # the first goes
    assert [r.start for r in entry.recent] == [half, 2 * half, 2 * half + 1, 2 * half + 3]
    assert entry.recent_bytes == RECENT_BYTES + 3
    big = _records(3 * half + 3, [RECENT_BYTES * 2])  # one record beyond it is kept alone
    entry.remember(big)
    assert list(entry.recent) == list(big)
    assert entry.recent_bytes == RECENT_BYTES * 2


def test_committed_writes_remember_as_remember_does() -> None:
    """`committed_write` writes out `remember`'s case of one following record: the same
    records and bytes, the oldest dropped at the limit, a gap starting over, and the
    write counted done (its `inflight` back to 0) either way."""
    committed, remembered = Entry("a"), Entry("b")
    half = RECENT_BYTES // 2
    writes = [
        _records(0, [10]),  # (into an empty memory)
        _records(10, [half]),
        _records(10 + half, [7, 8]),  # (several records)
        _records(25 + half, [half]),  # (the oldest go)
        _records(10**6, [5]),  # (a gap)
        _records(10**6 + 5, [RECENT_BYTES * 2]),  # (one record beyond the limit, alone)
        _records(10**6 + 5 + RECENT_BYTES * 2, [1]),
        (),
    ]
    for records in writes:
        committed.inflight = 1
        assert not committed.committed_write(None, 1, records)
        assert committed.inflight == 0
        if records:
            remembered.remember(records)
        assert list(committed.recent) == list(remembered.recent)
        assert committed.recent_bytes == remembered.recent_bytes
