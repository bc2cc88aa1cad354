"""POST: appends, content types, Stream-Seq, closure, idempotent producers (5.2, 5.2.1, 5.3)."""

import json

import pytest
from coresim import Sim, hdr, jbody

from ds_cluster.shard.core import offsets

P = "producer"


def prod(pid: str, epoch: int, seq: int) -> dict[str, str]:
    return {"producer_id": pid, "producer_epoch": str(epoch), "producer_seq": str(seq)}


@pytest.fixture
def s() -> Sim:
    sim = Sim()
    sim.put("a")
    return sim


def test_append_and_offsets_increase(s):
    offs = []
    for i in range(5):
        r = s.post("a", f"chunk{i}")
        assert r.status == 204
        offs.append(hdr(r, "stream-next-offset"))
    assert offs == sorted(offs) and len(set(offs)) == 5
    assert s.read_all("a") == b"chunk0chunk1chunk2chunk3chunk4"
    assert s.states["a"].last_access == s.now


def test_append_writes_refresh_last_access(s):
    s.now += 10
    s.post("a", "x")
    assert s.states["a"].last_access == s.now


def test_content_type_matching(s):
    assert s.post("a", "x", ct="TEXT/PLAIN").status == 204
    assert s.post("a", "x", ct="text/plain; charset=utf-8").status == 204
    before = dict(s.states)
    assert s.post("a", "{}", ct="application/json").status == 409
    assert s.post("a", "x", ct=None).status == 400
    assert s.post("a", "x", ct="nonsense").status == 400
    assert s.states == before


def test_empty_body_rules(s):
    assert s.post("a", "").status == 400
    assert s.post("a", "", **prod(P, 0, 0)).status == 400
    assert s.states["a"].producers == {}


def test_post_missing_stream():
    s = Sim()
    assert s.post("nope", "data").status == 404
    assert s.post("nope", "", stream_closed="true").status == 404
    assert s.post("nope", "data", **prod(P, 0, 0)).status == 404
    assert s.states == {}


def test_stream_seq_lexicographic(s):
    assert s.post("a", "1", stream_seq="001").status == 204
    assert s.post("a", "2", stream_seq="002").status == 204
    assert s.post("a", "x", stream_seq="001").status == 409
    assert s.post("a", "x", stream_seq="002").status == 409
    assert s.post("a", "x", stream_seq="").status == 400
    s.put("b")
    assert s.post("b", "x", stream_seq="2").status == 204
    assert s.post("b", "x", stream_seq="10").status == 409  # "10" < "2"
    s.put("c")
    assert s.post("c", "x", stream_seq="09").status == 204
    assert s.post("c", "x", stream_seq="10").status == 204
    s.put("d")
    assert s.post("d", "x", stream_seq="a").status == 204
    assert s.post("d", "x", stream_seq="B").status == 409
    assert s.read_all("a") == b"12"


def test_json_append_flattening_and_validation():
    s = Sim()
    s.put("j", ct="application/json")
    assert s.post("j", '{"event":"first"}', ct="application/json").status == 204
    assert s.post("j", "[[1,2],[3,4]]", ct="application/json").status == 204
    assert s.post("j", "[[[1,2,3]]]", ct="application/json").status == 204
    assert s.post("j", "42", ct="application/json; charset=utf-8").status == 204
    for bad in ("[]", "{ invalid json }", "[1,", "NaN"):
        assert s.post("j", bad, ct="application/json").status == 400
    assert jbody(s.get("j")) == [{"event": "first"}, [1, 2], [3, 4], [[1, 2, 3]], 42]
    assert s.states["j"].tail == 5


def test_close_only_and_idempotent_close(s):
    s.post("a", "content")
    r = s.post("a", "", ct=None, stream_closed="true")
    assert r.status == 204 and hdr(r, "stream-closed") == "true"
    assert hdr(r, "stream-next-offset") == offsets.encode(7)
    r = s.post("a", "", ct=None, stream_closed="true")
    assert r.status == 204 and hdr(r, "stream-closed") == "true"
    assert hdr(r, "stream-next-offset") == offsets.encode(7)


def test_close_only_ignores_content_type():
    s = Sim()
    s.put("j", ct="application/json")
    r = s.post("j", "", ct="text/plain", stream_closed="true")
    assert r.status == 204 and s.states["j"].closed


def test_close_with_final_append(s):
    s.post("a", "first message")
    r = s.post("a", "final message", stream_closed="true")
    assert r.status == 204 and hdr(r, "stream-closed") == "true"
    assert s.read_all("a") == b"first messagefinal message"


def test_appends_to_closed_stream_conflict_with_closed_header(s):
    s.post("a", "some content")
    s.post("a", "", ct=None, stream_closed="true")
    before = (dict(s.states), list(s.records["a"]))
    for kwargs in (
        dict(body="should fail"),
        dict(body="should fail", stream_closed="true"),
        dict(body="{}", ct="application/json"),  # closed wins over type mismatch
        dict(body="x", **prod(P, 0, 0)),
    ):
        body = kwargs.pop("body")
        r = s.post("a", body, **kwargs)
        assert r.status == 409
        assert hdr(r, "stream-closed") == "true"
        assert hdr(r, "stream-next-offset") == offsets.encode(12)
    assert (dict(s.states), list(s.records["a"])) == before


def test_non_true_closed_values_are_ignored(s):
    for v in ("false", "yes", "1", ""):
        assert s.post("a", "x", stream_closed=v).status == 204
    assert not s.states["a"].closed


def test_producer_basic_flow(s):
    r = s.post("a", "hello", **prod(P, 0, 0))
    assert r.status == 200
    assert hdr(r, "producer-epoch") == "0" and hdr(r, "producer-seq") == "0"
    assert hdr(r, "stream-next-offset") == offsets.encode(5)
    assert s.post("a", "m1", **prod(P, 0, 1)).status == 200
    assert s.post("a", "m2", **prod(P, 0, 2)).status == 200
    r = s.post("a", "m1", **prod(P, 0, 1))  # duplicate
    assert r.status == 204 and hdr(r, "producer-seq") == "2"
    assert s.read_all("a") == b"hellom1m2"


def test_producer_epochs_and_gaps(s):
    s.post("a", "x", **prod(P, 0, 0))
    r = s.post("a", "x", **prod(P, 0, 2))
    assert r.status == 409
    assert hdr(r, "producer-expected-seq") == "1" and hdr(r, "producer-received-seq") == "2"
    assert s.post("a", "x", **prod(P, 1, 5)).status == 400
    r = s.post("a", "e1", **prod(P, 1, 0))
    assert r.status == 200 and hdr(r, "producer-epoch") == "1"
    r = s.post("a", "zombie", **prod(P, 0, 1))
    assert r.status == 403 and hdr(r, "producer-epoch") == "1"
    assert s.read_all("a") == b"xe1"


def test_unknown_producer_must_start_at_zero(s):
    r = s.post("a", "x", **prod(P, 3, 2))
    assert r.status == 409 and hdr(r, "producer-expected-seq") == "0"
    assert s.post("a", "x", **prod(P, 3, 0)).status == 200


def test_producers_are_independent_and_interleave(s):
    for pid, seq in (("A", 0), ("B", 0), ("A", 1), ("B", 1)):
        assert s.post("a", f"{pid}{seq}", **prod(pid, 0, seq)).status == 200
    assert s.read_all("a") == b"A0B0A1B1"


def test_producer_dedupe_precedes_stream_seq(s):
    h = dict(prod(P, 0, 0), stream_seq="app-seq-001")
    assert s.post("a", "msg", **h).status == 200
    assert s.post("a", "msg", **h).status == 204


def test_failed_json_append_does_not_advance_producer():
    s = Sim()
    s.put("j", ct="application/json")
    assert s.post("j", "{ invalid", ct="application/json", **prod(P, 0, 0)).status == 400
    assert s.post("j", "[]", ct="application/json", **prod(P, 0, 0)).status == 400
    assert s.states["j"].producers == {}
    assert s.post("j", '{"id":1}', ct="application/json", **prod(P, 0, 0)).status == 200
    assert s.post("j", '{"id":1}', ct="application/json", **prod(P, 0, 0)).status == 204
    assert s.post("j", '{"id":2}', ct="application/json", **prod(P, 0, 1)).status == 200
    assert jbody(s.get("j")) == [{"id": 1}, {"id": 2}]


def test_producer_state_commits_with_the_data(s):
    reply_state = None
    r = s.post("a", "x", **prod(P, 4, 0))
    assert r.status == 200
    reply_state = s.states["a"]
    assert reply_state.producers[P].epoch == 4 and reply_state.tail == 1


def test_producer_close_with_append_and_duplicates(s):
    r = s.post("a", "final message", stream_closed="true", **prod(P, 0, 0))
    assert r.status == 200 and hdr(r, "stream-closed") == "true"
    assert hdr(r, "producer-epoch") == "0" and hdr(r, "producer-seq") == "0"
    assert s.states["a"].closed_by == (P, 0, 0)
    r = s.post("a", "body-B", stream_closed="true", **prod(P, 0, 0))
    assert r.status == 204 and hdr(r, "stream-closed") == "true"
    for pid, seq in (("other", 0), (P, 1)):
        r = s.post("a", "no", stream_closed="true", **prod(pid, 0, seq))
        assert r.status == 409 and hdr(r, "stream-closed") == "true"
    assert s.read_all("a") == b"final message"


def test_producer_close_only(s):
    s.post("a", "message", **prod(P, 0, 0))
    r = s.post("a", "", ct=None, stream_closed="true", **prod(P, 0, 1))
    assert r.status == 204 and hdr(r, "stream-closed") == "true"
    assert hdr(r, "producer-seq") == "1"
    assert s.states["a"].producers[P].last_seq == 1
    r = s.post("a", "", ct=None, stream_closed="true", **prod(P, 0, 1))
    assert r.status == 204 and hdr(r, "stream-closed") == "true"
    r = s.post("a", "", ct=None, stream_closed="true", **prod("other", 0, 0))
    assert r.status == 409


def test_stale_epoch_after_close_is_rejected(s):
    s.post("a", "first", **prod(P, 0, 0))
    s.post("a", "final", stream_closed="true", **prod(P, 1, 0))
    r = s.post("a", "stale", stream_closed="true", **prod(P, 0, 1))
    assert r.status in (403, 409)
    assert s.read_all("a") == b"firstfinal"


def test_append_to_soft_deleted_is_410():
    s = Sim()
    s.put("src", "data")
    s.put("f", ct=None, stream_forked_from="/v1/stream/src")
    s.request("DELETE", "src")
    assert s.post("src", "more").status == 410
    assert s.post("src", "", ct=None, stream_closed="true").status == 410


def test_binary_append_is_stored_without_copy():
    s = Sim()
    s.put("b", ct="application/octet-stream")
    payload = bytes(range(256)) * 4
    s.post("b", payload, ct="application/octet-stream")
    assert s.records["b"][-1].data is payload
    assert s.read_all("b") == payload


# ---------------------------------------------------------------------------------------
# Bounded records: a large append is stored as several records, still one atomic write.

JSON = "application/json"


def _items(n: int) -> bytes:
    return b"[" + b",".join(b"%d" % i for i in range(n)) + b"]"


def test_large_json_append_is_stored_as_bounded_contiguous_records():
    s = Sim()
    s.put("j", ct=JSON)
    n = 60_000
    r = s.post("j", _items(n), ct=JSON)
    assert r.status == 204 and hdr(r, "stream-next-offset") == offsets.encode(n)
    records = s.records["j"]
    assert len(records) > 1
    assert records[0].start == 0 and records[-1].end == n
    assert all(a.end == b.start for a, b in zip(records, records[1:], strict=False))
    assert all(len(r.data) <= 64 * 1024 for r in records)
    assert json.loads(s.read_all("j").replace(b"][", b",")) == list(range(n))


def test_large_binary_append_is_stored_as_bounded_records():
    s = Sim()
    s.put("b", ct="application/octet-stream")
    body = bytes(range(256)) * 1000  # 256,000 bytes
    assert s.post("b", body, ct="application/octet-stream").status == 204
    assert [r.end - r.start for r in s.records["b"]] == [65536, 65536, 65536, 59392]
    assert s.read_all("b") == body


def test_large_append_with_a_producer_is_one_write_and_dedups_as_one():
    s = Sim()
    s.put("j", ct=JSON)
    body = _items(40_000)
    r = s.post("j", body, ct=JSON, **prod(P, 0, 0))
    assert r.status == 200 and hdr(r, "stream-next-offset") == offsets.encode(40_000)
    stored = list(s.records["j"])
    assert len(stored) > 1 and s.states["j"].producers[P].last_seq == 0
    retry = s.post("j", body, ct=JSON, **prod(P, 0, 0))
    assert retry.status == 204 and hdr(retry, "producer-seq") == "0"
    assert s.records["j"] == stored and s.states["j"].tail == 40_000


def test_create_with_a_large_body_stores_bounded_records():
    s = Sim()
    assert s.put("j", _items(50_000), ct=JSON).status == 201
    assert len(s.records["j"]) > 1 and s.states["j"].tail == 50_000
    assert s.put("k", bytes(200_000), ct="application/octet-stream").status == 201
    assert len(s.records["k"]) == 4 and s.states["k"].tail == 200_000


@pytest.mark.parametrize(
    "bad", [b'["\\ud800"]', b'{"a": "\\udfff"}', b"[1e999]", b"[1, -1e400]", b"[1,]"]
)
def test_strict_json_is_refused_and_changes_nothing(bad):
    s = Sim()
    s.put("j", "[1]", ct=JSON)
    before = (dict(s.states), list(s.records["j"]))
    r = s.post("j", bad, ct=JSON, **prod(P, 0, 0))
    assert r.status == 400 and b"invalid JSON" in r.body
    assert (dict(s.states), list(s.records["j"])) == before
    assert s.put("new", bad, ct=JSON).status == 400 and "new" not in s.states
