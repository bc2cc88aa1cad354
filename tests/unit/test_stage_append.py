"""The plain append's own lane on the shard (`ShardService.append_now`) does what the
general one (`decide_now`) does: `core.plain_append_parts` decides as `core.plain_append`
(tested against the general path in test_core_append_fast.py), the answer sent is the
same bytes, and `_stage_append` queues exactly the write the general `_stage` builds, its
`tail_moved` (the stored row may lag, not compared again by the store) being what the
store's own comparison would answer."""

import functools
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from ds_cluster.common import wire
from ds_cluster.shard import store as store_module
from ds_cluster.shard.committer import Committer, Job
from ds_cluster.shard.core import protocol
from ds_cluster.shard.core.model import ForkOrigin, Request, StreamState, advance
from ds_cluster.shard.core.producers import ProducerState
from ds_cluster.shard.service import ShardService
from ds_cluster.shard.streams import Entry

NOW = 1_800_000_000.0
_FORK = ForkOrigin("src", "0000000000000000_0000000000000000", 0, 0, "ref-1", True)

states = st.builds(
    StreamState,
    path=st.just("a/b"),
    content_type=st.sampled_from(["application/octet-stream", "text/plain"]),
    created_at=st.sampled_from([NOW - 100, NOW - 5]),
    tail=st.integers(0, 10_000),
    closed=st.just(False),
    last_access=st.floats(NOW - 2000, NOW),
    last_stream_seq=st.one_of(st.none(), st.sampled_from(["a", "m"])),
    closed_by=st.one_of(st.none(), st.just(("p", 0, 3))),
    producers=st.one_of(st.just({}), st.just({"p": ProducerState(0, 3)})),
    fork=st.one_of(st.none(), st.just(_FORK)),
    refcount=st.sampled_from([0, 2]),
)


def _fake_service() -> tuple[SimpleNamespace, list[tuple[Job, str]]]:
    """What `_stage` and `_stage_append` use of the service: new sids, notices, and a
    committer (over a store that is never written: nothing here commits)."""
    staged: list[tuple[Job, str]] = []
    notices = SimpleNamespace(stage=lambda job, path: staged.append((job, path)))
    fake = SimpleNamespace(
        table=SimpleNamespace(new_sid=lambda: 999),
        subs=SimpleNamespace(notices=notices),
        committer=Committer(SimpleNamespace(failure=None), lambda jobs: None),  # type: ignore[arg-type]
    )
    return fake, staged


@settings(max_examples=300)
@given(state=states, body=st.binary(min_size=1, max_size=64), sid=st.integers(1, 50))
def test_stage_append_builds_the_general_write(state, body, sid):
    request = Request("POST", "a/b", "", {"content-type": state.content_type}, body)
    reply = protocol.plain_append(request, state, NOW)
    assert reply is not None and reply.state is not None

    def entry() -> Entry:
        made = Entry("a/b")
        made.committed = made.pending = state
        made.committed_sid = made.pending_sid = sid
        return made

    fake, staged = _fake_service()
    general_job = Job()
    general = ShardService._stage(
        fake,  # type: ignore[arg-type]
        general_job,
        entry(),
        reply.state,
        reply.records,
        fresh=reply.fresh,
    )
    parts = protocol.plain_append_parts(request.headers, body, state, NOW)
    assert parts is not None
    new_state, record, _offset = parts
    fast_entry = entry()
    fast_job = ShardService._stage_append(fake, fast_entry, state, new_state, record)  # type: ignore[arg-type]
    assert fast_job is fake.committer.shared_job()  # (queued, and still open)
    [(written, fast)] = fast_job.writes
    assert written is fast_entry
    assert (fast_entry.pending, fast_entry.pending_sid, fast_entry.inflight) == (new_state, sid, 1)
    assert fast.tail_moved == store_module._only_tail_moved(state, reply.state)
    assert not general.tail_moved
    fast.tail_moved = False
    assert fast == general
    assert staged == [(general_job, "a/b"), (fast_job, "a/b")]
    assert fast_job.outbox_put == general_job.outbox_put == []


@settings(max_examples=300)
@given(
    state=states,
    body=st.binary(max_size=64),
    headers=st.fixed_dictionaries(
        {},
        optional={
            "content-type": st.sampled_from(["application/octet-stream", "text/plain"]),
            "stream-seq": st.just("a"),
            "producer-id": st.just("p"),
        },
    ),
    call_id=st.integers(0, 2**40),
)
def test_plain_append_parts_decide_and_answer_as_plain_append(state, body, headers, call_id):
    request = Request("POST", "a/b", "", headers, body)
    reply = protocol.plain_append(request, state, NOW)
    parts = protocol.plain_append_parts(headers, body, state, NOW)
    if reply is None:
        assert parts is None
        return
    assert parts is not None
    new_state, record, offset = parts
    assert (reply.state, reply.records) == (new_state, (record,))
    response = reply.response
    assert [wire.append_answer(call_id, offset)] == wire.encode_response(
        call_id, response.status, response.headers, response.body
    )


@settings(max_examples=200)
@given(
    state=states,
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=5),
    committed=st.integers(0, 5),
    read_between=st.booleans(),
)
def test_plain_appends_keep_the_tail_beside_the_state(state, sizes, committed, read_between):
    """`append_typed` leaves a plain append's state uncopied (a stream without a fork
    origin or `closed_by`), its tail beside it: the entry's pending and committed states,
    read at any point, are what copying each append's state (`core.plain_append_typed`)
    makes, and so is each write once advanced; a state with a fork origin or a
    `closed_by` is copied as before (the append clears `closed_by`)."""
    fake, _staged = _fake_service()
    fake.offload = SimpleNamespace(engaged_write=lambda path, body: False)
    fake.handoff = SimpleNamespace(admits_now=lambda path: True)
    made = Entry("a/b")
    made.committed = made.pending = state
    made.committed_sid = made.pending_sid = 7
    fake.table.get = lambda path: made
    fake._stage_append = functools.partial(ShardService._stage_append, fake)
    fake._append_copied = functools.partial(ShardService._append_copied, fake)
    expected = state
    writes = []
    for size in sizes:
        copying = expected.fork is not None or expected.closed_by is not None
        appended = ShardService.append_typed(fake, "a/b", state.content_type, b"x" * size)  # type: ignore[arg-type]
        assert appended is not None
        entry, job, record, offset = appended
        write = job.writes[-1][1]
        writes.append(write)
        assert (write.accessed is None) == copying
        now = write.accessed if write.accessed is not None else write.state.last_access
        parts = protocol.plain_append_typed(state.content_type, b"x" * size, expected, now)
        assert parts is not None
        expected = parts[0]
        assert (record, offset) == parts[1:]
        advanced = (
            write.state if write.accessed is None else advance(write.state, write.tail(), now)
        )
        assert advanced == expected and write.tail() == expected.tail
        if read_between:
            assert entry.pending == expected
    assert made.pending == expected
    assert made.pending is made.pending  # (made once, then kept)
    for n, write in enumerate(writes[:committed]):
        made.committed_write(write.state, write.sid, write.records, write.accessed)
        assert made.committed is not None and made.committed.tail == writes[n].tail()
    if committed >= len(writes):
        assert made.committed == expected
    made.committed = state
    assert made.committed is state and not made.committed_moved
