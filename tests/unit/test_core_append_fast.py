"""The core's plain-append fast lane decides exactly as the general append path.

`core.handle` tries `plain_append` first for every POST on an existing stream; whatever
it answers (or declines) must be what `_append` alone would answer: the same response,
the same new state, the same records. Hypothesis draws streams and requests around the
lane's edges (expiry, closure, producers, Stream-Seq, content types that differ by
case, spacing or parameters, JSON, empty and oversized bodies, the position limit)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ds_cluster.shard.core import bodies, protocol
from ds_cluster.shard.core.errors import ProtocolError
from ds_cluster.shard.core.model import (
    BodyPieces,
    Decision,
    NeedBody,
    Reply,
    Request,
    StreamState,
    advance,
    evolve,
)
from ds_cluster.shard.core.offsets import MAX_POSITION
from ds_cluster.shard.core.producers import ProducerState

NOW = 1_800_000_000.0

_TYPES = [
    "application/octet-stream",
    "text/plain",
    "text/plain; charset=utf-8",
    "Text/Plain",
    " text/plain",
    "text/plain ",
    "application/json",
    "application/json; charset=utf-8",
    "not a type",
    "",
]


def _general(request: Request, state: StreamState | None, now: float) -> Decision:
    """What `handle` answered for a POST before the fast lane: `_append` alone."""
    try:
        return protocol._append(request, state, now)
    except ProtocolError as err:
        return Reply(err.response())
    except bodies.BodyDeferred as deferred:
        return NeedBody(deferred.json)


states = st.builds(
    StreamState,
    path=st.just("a/b"),
    content_type=st.sampled_from([t.strip() or "application/octet-stream" for t in _TYPES]),
    created_at=st.just(NOW - 100),
    tail=st.one_of(st.integers(0, 10_000), st.just(MAX_POSITION - 50)),
    closed=st.booleans(),
    ttl=st.one_of(st.none(), st.integers(0, 1000)),
    expires_at=st.none(),
    expires_at_ts=st.one_of(st.none(), st.floats(NOW - 10, NOW + 10)),
    last_access=st.floats(NOW - 2000, NOW),
    last_stream_seq=st.one_of(st.none(), st.sampled_from(["a", "m"])),
    closed_by=st.one_of(st.none(), st.just(("p", 0, 3))),
    producers=st.one_of(st.just({}), st.just({"p": ProducerState(0, 3)})),
    soft_deleted=st.booleans(),
)

header_maps = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(_TYPES),
        "producer-id": st.sampled_from(["p", "q", ""]),
        "producer-epoch": st.sampled_from(["0", "1", "x"]),
        "producer-seq": st.sampled_from(["3", "4", "9"]),
        "stream-closed": st.sampled_from(["true", "false", "TRUE"]),
        "stream-seq": st.sampled_from(["", "a", "z"]),
        "if-none-match": st.just('"x"'),
    },
)

request_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"[]", b"[1,2]", b'{"a":1}', b"not json"]),
    st.just(b"y" * (bodies.MAX_RECORD_BYTES + 1)),
)


@settings(max_examples=1000)
@given(
    state=states,
    headers=header_maps,
    body=request_bodies,
    defer=st.booleans(),
    prepared=st.sampled_from([None, BodyPieces(False, ((b"z", 1),))]),
    live=st.booleans(),
    own_type=st.booleans(),
)
def test_handle_decides_an_append_as_the_general_path(
    state, headers, body, defer, prepared, live, own_type
):
    if live:  # (else the lane is rarely reached: most drawn states expire or are closed)
        state = evolve(state, closed=False, soft_deleted=False, ttl=None, expires_at_ts=None)
    if own_type:
        headers = {**headers, "content-type": state.content_type}
    request = Request("POST", "a/b", "", headers, body, defer, prepared)
    assert protocol.handle(request, state, NOW, protocol.CoreConfig()) == _general(
        request, state, NOW
    )


@given(state=states, body=st.binary(min_size=1, max_size=200))
def test_the_plain_case_takes_the_fast_lane(state, body):
    """A live stream's plain append (its own type, no extra headers) is taken by the
    lane, which then answers as the general path."""
    live = not (state.closed or state.soft_deleted) and state.ttl is None
    live = live and state.expires_at_ts is None and state.tail + len(body) <= MAX_POSITION
    request = Request("POST", "a/b", "", {"content-type": state.content_type}, body)
    fast = protocol.plain_append(request, state, NOW)
    ct = state.content_type
    if live and protocol.valid_content_type(ct) and not protocol.is_json(ct):
        assert fast is not None
        assert fast == _general(request, state, NOW)
        assert fast.response.status == 204
        assert fast.state is not None and fast.state.tail == state.tail + len(body)
    else:
        assert fast is None


@settings(max_examples=500)
@given(
    state=states,
    bodies_=st.lists(request_bodies, min_size=1, max_size=4),
    own_type=st.booleans(),
    other_type=st.sampled_from(_TYPES),
)
def test_appends_at_a_kept_tail_decide_as_appends_on_advanced_states(
    state, bodies_, own_type, other_type
):
    """`plain_append_at` of a state and a tail kept beside it (the runtime's
    `Entry.pending_tail`) decides each of a run of appends as `plain_append_typed` on the
    state advanced to that tail: the same record and offset, and the same new state once
    advanced to the record's end."""
    content_type = state.content_type if own_type else other_type
    tail = state.tail
    advanced = state
    for i, body in enumerate(bodies_):
        now = NOW + i
        kept = protocol.plain_append_at(content_type, body, state, tail)
        copied = protocol.plain_append_typed(content_type, body, advanced, now)
        if copied is None:
            assert kept is None
            return
        assert kept is not None
        new_state, record, offset = copied
        assert kept == (record, offset)
        assert advance(state, record.end, now) == new_state
        tail, advanced = record.end, new_state
