"""Unit tests of the core's small pure helpers: offsets, header parsers, JSON mode."""

import dataclasses
import json
import random

import pytest

from ds_cluster.shard.core import bodies, jsonmode, offsets, producers
from ds_cluster.shard.core.cursor import current_interval, next_cursor
from ds_cluster.shard.core.errors import ProtocolError
from ds_cluster.shard.core.headers import (
    is_json,
    is_sse_text,
    is_true,
    media_type,
    parse_expires_at,
    parse_producer,
    parse_read_query,
    parse_sub_offset,
    parse_ttl,
    request_content_type,
)
from ds_cluster.shard.core.model import (
    BodyPieces,
    CoreConfig,
    ProducerState,
    StreamState,
    advance,
    evolve,
)


def test_offsets_roundtrip_and_order():
    assert offsets.encode(0) == "0000000000000000_0000000000000000"
    toks = [offsets.encode(p) for p in (0, 1, 9, 10, 99, 12345, 10**15)]
    assert toks == sorted(toks)
    for p in (0, 5, 10**16 - 1):
        assert offsets.decode(offsets.encode(p)) == p
    assert "-1" not in toks and "now" not in toks


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "-1",
        "now",
        "0,1",
        "0 1",
        "abc",
        "0000000000000000_000000000000000",  # short
        "0000000000000001_0000000000000000",  # reserved field non-zero
        "0000000000000000_00000000000000０0",  # non-ASCII digit
        "0000000000000000-0000000000000000",
        "0000000000000000_0000000000000000\n",
        "../0000000000000000_000000000000000",
    ],
)
def test_offsets_reject_malformed(bad):
    assert offsets.decode(bad) is None


def test_stream_closed_values():
    assert is_true("true") and is_true("TRUE") and is_true("True")
    for v in (None, "false", "yes", "1", "", "truee"):
        assert not is_true(v)


@pytest.mark.parametrize("good,val", [("0", 0), ("1", 1), ("3600", 3600)])
def test_ttl_valid(good, val):
    assert parse_ttl(good) == val


@pytest.mark.parametrize("bad", ["abc", "-1", "+60", "00060", "60.5", "1e3", "", " ", "0x10"])
def test_ttl_invalid(bad):
    with pytest.raises(ProtocolError) as e:
        parse_ttl(bad)
    assert e.value.status == 400


def test_expires_at():
    z = parse_expires_at("2030-01-01T00:00:00Z")
    assert z == parse_expires_at("2030-01-01T00:00:00+00:00")
    assert z == parse_expires_at("2030-01-01T01:00:00+01:00")
    assert parse_expires_at("2030-01-01T00:00:00.500Z") == z + 0.5
    for bad in ("not-a-timestamp", "2030-01-01", "2030-13-01T00:00:00Z", "2030-01-01T00:00:00"):
        with pytest.raises(ProtocolError):
            parse_expires_at(bad)


def test_sub_offset():
    assert parse_sub_offset("0") == 0 and parse_sub_offset("12") == 12
    for bad in ("-1", "abc", "1.5", "05", "+1", ""):
        with pytest.raises(ProtocolError):
            parse_sub_offset(bad)


def test_producer_headers():
    assert parse_producer({}) is None
    assert parse_producer({"producer-id": "p", "producer-epoch": "1", "producer-seq": "2"}) == (
        "p",
        1,
        2,
    )
    for bad in (
        {"producer-id": "p"},
        {"producer-epoch": "0"},
        {"producer-id": "p", "producer-epoch": "0"},
        {"producer-id": "", "producer-epoch": "0", "producer-seq": "0"},
        {"producer-id": "p", "producer-epoch": "0", "producer-seq": "1abc"},
        {"producer-id": "p", "producer-epoch": "0xyz", "producer-seq": "0"},
        {"producer-id": "p", "producer-epoch": "1e3", "producer-seq": "0"},
        {"producer-id": "p", "producer-epoch": "-1", "producer-seq": "0"},
        {"producer-id": "p", "producer-epoch": str(2**53), "producer-seq": "0"},
    ):
        with pytest.raises(ProtocolError) as e:
            parse_producer(bad)
        assert e.value.status == 400


def test_content_types():
    assert media_type("Application/JSON; charset=utf-8") == "application/json"
    assert is_json("application/json; charset=utf-8") and not is_json("application/ndjson")
    assert is_sse_text("text/plain") and is_sse_text("application/json")
    assert not is_sse_text("application/octet-stream") and not is_sse_text("image/png")
    assert request_content_type({}) is None and request_content_type({"content-type": " "}) is None
    with pytest.raises(ProtocolError):
        request_content_type({"content-type": "garbage"})


def test_read_query():
    assert parse_read_query("") == (None, None, None)
    assert parse_read_query("offset=-1&live=long-poll&cursor=7&x=y") == ("-1", "long-poll", "7")
    assert parse_read_query("offset=0%201")[0] == "0 1"
    for bad in ("offset=", "offset", "offset=a&offset=b"):
        with pytest.raises(ProtocolError):
            parse_read_query(bad)


def test_json_parse_body_flattening():
    assert jsonmode.parse_body(b'{"a": 1}', allow_empty=False) == (b'{"a": 1}', 1)
    assert jsonmode.parse_body(b' [ {"a":1} , {"b":2} ] ', allow_empty=False) == (
        b'{"a":1} , {"b":2}',
        2,
    )
    assert jsonmode.parse_body(b"[[1,2],[3,4]]", allow_empty=False) == (b"[1,2],[3,4]", 2)
    assert jsonmode.parse_body(b"[[[1,2,3]]]", allow_empty=False) == (b"[[1,2,3]]", 1)
    assert jsonmode.parse_body(b"[]", allow_empty=True) == (b"", 0)
    for bad in (b"[]", b"{ invalid json }", b"NaN", b"[1, Infinity]", b"\xff", b"1 2", b""):
        with pytest.raises(ProtocolError) as e:
            jsonmode.parse_body(bad, allow_empty=False)
        assert e.value.status == 400


def test_json_split_head_tail():
    data, n = jsonmode.parse_body(b'[{"a":[1,2]}, "x,y" ,3,\n null]', allow_empty=False)
    assert n == 4
    assert jsonmode.split_messages(data) == [b'{"a":[1,2]}', b'"x,y"', b"3", b"null"]
    assert jsonmode.head(data, 2, 4) == b'{"a":[1,2]},"x,y"'
    assert jsonmode.tail(data, 3) == b"null"
    assert jsonmode.render([data]) == b'[{"a":[1,2]}, "x,y" ,3,\n null]'


def _pieces_cover(body: bytes) -> list[tuple[bytes, int]]:
    """Plan `body`, check the pieces are valid JSON covering its messages in order."""
    plan = jsonmode.plan_body(body)
    assert not isinstance(plan, str), plan
    parts = [(body[a:b], n) for a, b, n in plan]
    expected = json.loads(body)
    expected = expected if isinstance(expected, list) else [expected]
    got = []
    for data, n in parts:
        values = json.loads(b"[" + data + b"]")
        assert len(values) == n >= 1
        got += values
    assert got == expected
    return parts


def test_json_plan_cuts_flat_bodies_into_bounded_records():
    body = b"[" + b",".join(b"%d" % (i % 1000) for i in range(100_000)) + b"]"
    parts = _pieces_cover(body)
    assert len(parts) > 1
    assert all(len(data) <= jsonmode.MAX_RECORD_BYTES for data, _ in parts)
    assert b",".join(data for data, _ in parts) == body[1:-1]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([1, -2.5, "a,b", "x]y}", "é€\u2028", None, True, 'q"\\', 10**20])
    if r < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i},": _random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


@pytest.mark.parametrize("seed", range(6))
def test_json_plan_cuts_nested_bodies_at_message_boundaries(seed):
    rng = random.Random(seed)
    values = [_random_value(rng) for _ in range(rng.choice([3, 3000, 20_000]))]
    body = json.dumps(
        values, ensure_ascii=seed % 2 == 0, separators=(",", ":") if seed % 3 else (", ", ": ")
    ).encode()
    for data, n in _pieces_cover(body):
        assert n <= jsonmode.MAX_RECORD_MESSAGES
        assert len(data) <= jsonmode.MAX_RECORD_BYTES or n == 1


def test_json_plan_small_messages_with_structure_are_bounded_by_count():
    body = b"[" + b",".join([b"[1,2]", b'"a,b"', b"{}"] * 5000) + b"]"
    parts = _pieces_cover(body)
    assert max(n for _, n in parts) <= jsonmode.MAX_RECORD_MESSAGES
    assert sum(n for _, n in parts) == 15_000


def test_json_plan_keeps_a_large_message_whole():
    big = json.dumps({"x": list(range(50_000))}).encode()
    parts = _pieces_cover(b"[1," + big + b",2]")
    assert parts == [(b"1", 1), (big, 1), (b"2", 1)]
    assert _pieces_cover(big) == [(big, 1)]
    assert _pieces_cover(b"  " + big + b"\n") == [(big, 1)]


def test_json_plan_byte_offsets_with_multibyte_text():
    body = json.dumps(["é" * 30_000, "x", "€" * 40_000], ensure_ascii=False).encode()
    assert [n for _, n in _pieces_cover(body)] in ([1, 2], [2, 1], [1, 1, 1], [3])


@pytest.mark.parametrize(
    "bad",
    [
        b"[1,]",
        b"[,1]",
        b"[1,,2]",
        b"[1",
        b"1]",
        b"[1],[2]",
        b"",
        b"  ",
        b"1 2",
        b"[NaN]",
        b"[1, -Infinity]",
        b'["\xed\xa0\x80"]',  # a surrogate encoded as UTF-8 bytes
        b"[" + b"1," * 40_000 + b"]",  # a trailing comma after many pieces
        b"[" + b"1," * 40_000 + b"x]",
        b"[" + b'"a",' * 40_000 + b"[}]",
    ],
)
def test_json_plan_rejects_invalid_bodies(bad):
    assert isinstance(jsonmode.plan_body(bad), str)


@pytest.mark.parametrize(
    "bad",
    [
        b'["\\ud800"]',
        b'["\\uDBFF x"]',
        b'["\\udc00"]',
        b'["ok", "\\ud800\\ud800"]',
        b'{"\\ud83d": 1}',
        b'"\\ude00\\ud83d"',  # the pair in the wrong order
        b"[1e999]",
        b"[-1E+400]",
        b"1e309",
        b"[" + b"9" * 400 + b".5]",
        b"[" + b"9" * 250 + b"e99]",
        b"[" + b"1," * 40_000 + b"1e999]",  # in a later piece
        b"[" + b'"x",' * 40_000 + b'"\\udfff"]',
    ],
)
def test_json_plan_rejects_lone_surrogates_and_overflowing_numbers(bad):
    error = jsonmode.plan_body(bad)
    assert isinstance(error, str) and error.startswith("invalid JSON"), error


@pytest.mark.parametrize(
    "good",
    [
        b'["\\ud83d\\ude00"]',  # a pair
        b'["\\\\ud800"]',  # an escaped backslash, then text
        b'["\\u00e9\\u20ac"]',
        b"[1e308, -1.7e308, 1e-999, 123456789012345678901234567890]",
        b"[" + b"9" * 400 + b"]",  # a big integer is not a float
        b'["1e999"]',
    ],
)
def test_json_plan_accepts_what_is_strictly_valid(good):
    assert not isinstance(jsonmode.plan_body(good), str)


def test_json_split_fast_path_matches_the_scan():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 60)
        seps = [",", ", ", " ,", "\n,\t"]
        scalars = ["1", "-2.5e3", "true", "null", "0"]
        data = "".join(
            rng.choice(scalars) + (rng.choice(seps) if i < n - 1 else "") for i in range(n)
        ).encode()
        k = rng.randint(0, n)
        messages = jsonmode.split_messages(data)
        assert len(messages) == n
        assert json.loads(b"[" + jsonmode.head(data, k, n) + b"]") == json.loads(
            b"[" + b",".join(messages[:k]) + b"]"
        )
        assert json.loads(b"[" + jsonmode.tail(data, k) + b"]") == json.loads(
            b"[" + b",".join(messages[k:]) + b"]"
        )


def test_json_split_of_an_old_unbounded_record():
    # Records stored before bounded records existed hold a whole append.
    n = 200_000
    data = b",".join(b"%d" % i for i in range(n))
    assert jsonmode.tail(data, n - 2) == b"%d,%d" % (n - 2, n - 1)
    assert jsonmode.head(data, 3, n) == b"0,1,2"
    assert jsonmode.tail(data, 1) == data[2:]
    nested = b",".join(b"[%d]" % i for i in range(5000))
    assert jsonmode.tail(nested, 4998) == b"[4998],[4999]"


def test_binary_bodies_become_bounded_records():
    size = 3 * bodies.MAX_RECORD_BYTES + 5
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    records = bodies.records("application/octet-stream", body, 10, allow_empty=False)
    assert [r.end - r.start for r in records] == [bodies.MAX_RECORD_BYTES] * 3 + [5]
    assert records[0].start == 10 and records[-1].end == 10 + size
    assert all(a.end == b.start for a, b in zip(records, records[1:], strict=False))
    assert b"".join(r.data for r in records) == body
    small = bodies.records("text/plain", b"abc", 0, allow_empty=False)
    assert len(small) == 1 and small[0].data == b"abc"  # the common case: no copy, one record


def test_prepared_pieces_are_used_only_for_their_kind():
    body = b"[1,2,3]"
    prepared = bodies.prepare(body, True)
    assert prepared == BodyPieces(True, ((b"1,2,3", 3),))
    records = bodies.records("application/json", body, 4, prepared, allow_empty=False)
    assert [(r.start, r.end, r.data) for r in records] == [(4, 7, b"1,2,3")]
    # A body cut as binary for a JSON stream (its request said octet-stream) is re-cut.
    wrong = bodies.prepare(body, False)
    records = bodies.records("application/json", body, 0, wrong, allow_empty=False)
    assert [(r.end, r.data) for r in records] == [(3, b"1,2,3")]
    with pytest.raises(ProtocolError) as err:
        bodies.records("application/json", body, 0, bodies.prepare(b"[1,", True), allow_empty=True)
    assert err.value.status == 400
    with pytest.raises(ProtocolError):
        bodies.records("application/json", b"[]", 0, bodies.prepare(b"[]", True), allow_empty=False)
    assert bodies.records("application/json", b"[]", 0, allow_empty=True) == ()


def test_large_bodies_are_cut_off_loop_only_when_the_core_needs_them():
    from dataclasses import replace

    from ds_cluster.shard import core
    from ds_cluster.shard.core.model import NeedBody, NeedSource, Reply, Request, StreamState

    config = CoreConfig()
    big = b"[" + b"1," * 40_000 + b"1]"
    json_state = StreamState(path="j", content_type="application/json", created_at=1.0)
    json_ct = {"content-type": "application/json"}

    def decide(method, body, state, headers=json_ct, defer=True):
        request = Request(method, "j", "", headers, body, defer_body=defer)
        return request, core.handle(request, state, 2.0, config)

    request, decision = decide("POST", big, json_state)
    assert decision == NeedBody(json=True)
    prepared = replace(request, body_pieces=bodies.prepare(big, True))
    reply = core.handle(prepared, json_state, 2.0, config)
    assert isinstance(reply, Reply) and reply.response.status == 204
    assert reply.state.tail == 40_001 and len(reply.records) > 1
    # Answered without the body: no cut is asked for.
    assert decide("POST", big, None)[1].response.status == 404
    closed = replace(json_state, closed=True)
    assert decide("POST", big, closed)[1].response.status == 409
    producer = {**json_ct, "producer-id": "p", "producer-epoch": "0", "producer-seq": "0"}
    done = replace(json_state, producers={"p": ProducerState(0, 0)})
    assert decide("POST", big, done, producer)[1].response.status == 204  # a retry
    assert decide("PUT", big, json_state)[1].response.status == 200  # exists: body unread
    assert isinstance(decide("PUT", big, None)[1], NeedBody)
    # A fork's body is cut before the source is asked (its type may be inherited).
    fork = {"stream-forked-from": "/v1/stream/src"}
    request, decision = decide("PUT", big, None, fork)
    assert decision == NeedBody(json=True)
    ready = replace(request, body_pieces=bodies.prepare(big, True))
    assert isinstance(core.handle(ready, None, 2.0, config), NeedSource)
    # Small bodies, and runtimes that do not defer, are cut inline.
    assert isinstance(decide("POST", b"[1,2]", json_state)[1], Reply)
    assert isinstance(decide("POST", big, json_state, defer=False)[1], Reply)
    # Binary bodies are deferred only when large enough to matter (a memcpy).
    binary_state = replace(json_state, content_type="application/octet-stream")
    binary = {"content-type": "application/octet-stream"}
    assert isinstance(decide("POST", bytes(500_000), binary_state, binary)[1], Reply)
    huge = bytes(2 * bodies.OFFLOAD_BINARY_BYTES)
    assert decide("POST", huge, binary_state, binary)[1] == NeedBody(json=False)


def test_producer_rules():
    table = {"p": ProducerState(1, 3)}
    assert producers.check(table, "new", 0, 0) == (True, ProducerState(0, 0))
    assert producers.check(table, "p", 1, 4) == (True, ProducerState(1, 4))
    assert producers.check(table, "p", 1, 2) == (False, ProducerState(1, 3))
    assert producers.check(table, "p", 2, 0) == (True, ProducerState(2, 0))
    for args, status in ((("p", 0, 9), 403), (("p", 2, 1), 400), (("p", 1, 6), 409)):
        with pytest.raises(ProtocolError) as e:
            producers.check(table, *args)
        assert e.value.status == status
    with pytest.raises(ProtocolError) as e:
        producers.check(table, "new", 0, 3)
    assert e.value.status == 409 and ("producer-expected-seq", "0") in e.value.headers


def test_cursor_rules():
    cfg = CoreConfig()
    now = cfg.cursor_epoch + 20 * 1000 + 5
    assert current_interval(now, cfg) == 1000
    assert next_cursor(None, now, cfg) == 1000
    assert next_cursor("999", now, cfg) == 1000
    assert next_cursor("junk", now, cfg) == 1000
    for _ in range(50):
        c = next_cursor("1000", now, cfg)
        assert 1000 < c <= 1000 + 180
        assert next_cursor("5000", now, cfg) > 5000


def test_evolve_and_advance_copy_every_field() -> None:
    """`evolve` and `advance` copy a state field by field: a field added to StreamState
    and not copied would be missing (or equal to the default) in every evolved state."""
    names = [f.name for f in dataclasses.fields(StreamState)]
    state = StreamState(**{name: ("distinct", name) for name in names})  # type: ignore[arg-type]
    assert evolve(state) == state
    assert evolve(state) is not state
    moved = evolve(state, tail=7, closed=False, closed_by=None, last_access=2.0)
    assert advance(state, 7, 2.0) == moved
    assert [getattr(moved, name) == getattr(state, name) for name in names] == [
        name not in ("tail", "closed", "closed_by", "last_access") for name in names
    ]
    with pytest.raises(AttributeError):
        evolve(state, no_such_field=1)
