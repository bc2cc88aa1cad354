"""Unit tests of the core's small pure helpers: offsets, header parsers, JSON mode."""

import pytest

from shard.core import jsonmode, offsets, producers
from shard.core.cursor import current_interval, next_cursor
from shard.core.errors import ProtocolError
from shard.core.headers import (
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
from shard.core.model import CoreConfig, ProducerState


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
