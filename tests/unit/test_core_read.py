"""GET catch-up reads: offsets, chunking, closure, ETag/304, caching (5.6, 8, 10)."""

import pytest
from coresim import Sim, hdr, jbody

from ds_cluster.shard.core import (
    CoreConfig,
    NeedRecords,
    Record,
    Reply,
    Request,
    finish_read,
    handle,
    offsets,
)

PUBLIC = "public, max-age=60, stale-while-revalidate=300"


@pytest.fixture
def s() -> Sim:
    sim = Sim()
    sim.put("a", "first")
    sim.post("a", "second")
    return sim


def test_read_everything(s):
    r = s.get("a")
    assert r.status == 200 and r.body == b"firstsecond"
    assert hdr(r, "content-type") == "text/plain"
    assert hdr(r, "stream-next-offset") == offsets.encode(11)
    assert hdr(r, "stream-up-to-date") == "true"
    assert hdr(r, "cache-control") == PUBLIC
    assert hdr(r, "etag").startswith('"') and hdr(r, "stream-closed") is None
    assert s.get("a", "offset=-1").body == r.body
    assert s.get("a", "offset=-1&foo=bar&baz=qux").body == r.body


def test_read_from_offsets(s):
    assert s.get("a", f"offset={offsets.encode(5)}").body == b"second"
    r = s.get("a", f"offset={offsets.encode(11)}")
    assert r.status == 200 and r.body == b"" and hdr(r, "stream-up-to-date") == "true"
    assert hdr(r, "stream-next-offset") == offsets.encode(11)
    # an offset inside a record (e.g. from a sub-offset fork) slices it
    assert s.get("a", f"offset={offsets.encode(7)}").body == b"cond"


def test_reads_touch_for_ttl(s):
    s.now += 5
    s.get("a")
    assert s.states["a"].last_access == s.now
    s.now += 5
    s.get("a", f"offset={offsets.encode(11)}")
    assert s.states["a"].last_access == s.now
    s.now += 5
    s.get("a", "offset=now")
    assert s.states["a"].last_access == s.now


@pytest.mark.parametrize(
    "query",
    [
        "offset=",
        "offset=a&offset=b",
        "offset=0,1",
        "offset=0%201",
        "offset=..%2Fx",
        "offset=abc%00",
        "offset=9999999999999999_9999999999999999",
        f"offset={offsets.encode(12)}",  # beyond the tail
        "live=long-poll",
        "live=sse",
        "offset=-1&live=bogus",
    ],
)
def test_bad_read_queries(s, query):
    before = dict(s.states)
    r = s.get("a", query)
    assert r.status == 400 and r.body
    assert s.states == before


def test_missing_and_gone():
    s = Sim()
    assert s.get("nope").status == 404
    assert s.get("nope", "offset=now").status == 404
    assert s.get("nope", "offset=now&live=long-poll").status == 404
    assert s.get("nope", "offset=now&live=sse").status == 404


def test_offset_now(s):
    r = s.get("a", "offset=now")
    assert r.status == 200 and r.body == b""
    assert hdr(r, "stream-next-offset") == offsets.encode(11)
    assert hdr(r, "stream-up-to-date") == "true"
    assert hdr(r, "cache-control") == "no-store"
    assert hdr(r, "etag") is None
    s.post("a", "new data")
    assert s.get("a", f"offset={hdr(r, 'stream-next-offset')}").body == b"new data"


def test_offset_now_json_and_closed():
    s = Sim()
    s.put("j", '[{"event": "historical"}]', ct="application/json")
    r = s.get("j", "offset=now")
    assert r.body == b"[]" and hdr(r, "content-type") == "application/json"
    s.post("j", "", ct=None, stream_closed="true")
    r = s.get("j", "offset=now")
    assert hdr(r, "stream-closed") == "true" and hdr(r, "stream-up-to-date") == "true"


def test_empty_stream_read():
    s = Sim()
    s.put("e")
    r = s.get("e")
    assert r.status == 200 and r.body == b"" and hdr(r, "stream-up-to-date") == "true"
    assert hdr(r, "stream-next-offset") == offsets.encode(0)


def test_closed_stream_reads(s):
    s.post("a", "", ct=None, stream_closed="true")
    r = s.get("a")
    assert r.body == b"firstsecond"
    assert hdr(r, "stream-closed") == "true" and hdr(r, "stream-up-to-date") == "true"
    r = s.get("a", f"offset={offsets.encode(11)}")
    assert r.body == b"" and hdr(r, "stream-closed") == "true"
    r = s.get("a", f"offset={offsets.encode(0)}")
    assert hdr(r, "stream-closed") == "true"


def test_chunking_and_partial_reads_of_closed_stream():
    s = Sim(config=CoreConfig(max_read_bytes=1000))
    s.put("b", ct="application/octet-stream")
    data = bytes(i % 256 for i in range(10_000))
    for i in range(0, len(data), 700):
        s.post("b", data[i : i + 700], ct="application/octet-stream")
    s.post("b", "", ct=None, stream_closed="true")
    r = s.get("b")
    assert len(r.body) >= 1000 and hdr(r, "stream-up-to-date") is None
    assert hdr(r, "stream-closed") is None  # partial: no EOF yet
    assert s.read_all("b") == data


def test_one_huge_record_is_returned_whole():
    s = Sim(config=CoreConfig(max_read_bytes=10))
    s.put("b", b"x" * 100, ct="application/octet-stream")
    r = s.get("b")
    assert len(r.body) == 100 and hdr(r, "stream-up-to-date") == "true"


def test_json_reads():
    s = Sim()
    s.put("j", ct="application/json")
    s.post("j", '{"type":"single"}', ct="application/json")
    s.post("j", '[{"type":"array","id":1},{"type":"array","id":2}]', ct="application/json")
    s.post("j", '[[{"n":1}]]', ct="application/json")
    assert jbody(s.get("j")) == [
        {"type": "single"},
        {"type": "array", "id": 1},
        {"type": "array", "id": 2},
        [{"n": 1}],
    ]
    assert jbody(s.get("j", f"offset={offsets.encode(1)}"))[0] == {"type": "array", "id": 1}
    assert jbody(s.get("j", f"offset={offsets.encode(2)}")) == [
        {"type": "array", "id": 2},
        [{"n": 1}],
    ]
    assert s.get("j", f"offset={offsets.encode(4)}").body == b"[]"


def test_etag_and_304(s):
    r1 = s.get("a")
    tag = hdr(r1, "etag")
    r2 = s.get("a", headers={"If-None-Match": tag})
    assert r2.status == 304 and r2.body == b"" and hdr(r2, "etag") == tag
    assert s.get("a", headers={"If-None-Match": f"W/{tag}"}).status == 304
    assert s.get("a", headers={"If-None-Match": f'"x", {tag}'}).status == 304
    assert s.get("a", headers={"If-None-Match": '"wrong-etag"'}).status == 200
    s.post("a", " more")
    r3 = s.get("a", headers={"If-None-Match": tag})
    assert r3.status == 200 and hdr(r3, "etag") != tag


def test_etag_changes_with_closure(s):
    tail = offsets.encode(11)
    t1 = hdr(s.get("a", f"offset={tail}"), "etag")
    t_full = hdr(s.get("a"), "etag")
    s.post("a", "", ct=None, stream_closed="true")
    r = s.get("a", f"offset={tail}", headers={"If-None-Match": t1})
    assert r.status == 200 and hdr(r, "stream-closed") == "true" and hdr(r, "etag") != t1
    assert s.get("a", headers={"If-None-Match": t_full}).status == 200


def test_etag_differs_between_incarnations(s):
    t1 = hdr(s.get("a"), "etag")
    s.request("DELETE", "a")
    s.now += 1
    s.put("a", "first")
    s.post("a", "second")
    assert hdr(s.get("a"), "etag") != t1


def test_finish_read_clips_to_state_tail():
    """Records newer than the state the runtime passed are never described."""
    s = Sim()
    s.put("a", "abc")
    state = s.states["a"]
    req = Request("GET", "a", "offset=-1")
    d = handle(req, state, s.now, s.config)
    assert isinstance(d, NeedRecords) and d.position == 0
    recs = [Record(0, 3, b"abc"), Record(3, 6, b"def")]
    reply = finish_read(req, state, recs, s.now, s.config)
    assert isinstance(reply, Reply) and reply.response.body == b"abc"
    assert hdr(reply.response, "stream-next-offset") == offsets.encode(3)
    assert reply.touch and not reply.changed


def test_finish_read_after_stream_vanished():
    s = Sim()
    s.put("a", "abc")
    req = Request("GET", "a", "")
    reply = finish_read(req, None, [], s.now, s.config)
    assert reply.response.status == 404


def test_json_read_at_any_position_inside_a_large_append():
    """A read at an unaligned position slices one bounded record (the position is
    inside the append, not at a record boundary) and returns exactly what follows."""
    s = Sim(config=CoreConfig(max_read_bytes=64 * 1024))
    s.put("j", ct="application/json")
    n = 100_000
    s.post("j", b"[" + b",".join(b"%d" % i for i in range(n)) + b"]", ct="application/json")
    bounds = [r.start for r in s.records["j"]]
    positions = {
        1,
        7,
        n - 1,
        *bounds[1:4],
        *(b - 1 for b in bounds[1:4]),
        *(b + 1 for b in bounds[1:4]),
    }
    for position in sorted(positions):
        r = s.get("j", f"offset={offsets.encode(position)}")
        assert r.status == 200
        end = offsets.decode(hdr(r, "stream-next-offset"))
        assert position < end <= n
        assert jbody(r) == list(range(position, end))


def test_binary_read_inside_a_large_append():
    s = Sim()
    s.put("b", ct="application/octet-stream")
    body = bytes(range(251)) * 1200
    s.post("b", body, ct="application/octet-stream")
    for position in (1, 65535, 65536, 65537, len(body) - 1):
        r = s.get("b", f"offset={offsets.encode(position)}")
        end = offsets.decode(hdr(r, "stream-next-offset"))
        assert r.body == body[position:end] and end > position
