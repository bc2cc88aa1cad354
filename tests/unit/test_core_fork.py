"""Forks (4.2): creation, sub-offsets, idempotency, TTL inheritance, refcounts, GC."""

import pytest
from coresim import Sim, hdr, jbody

from ds_cluster.shard.core import (
    CoreConfig,
    ForkExport,
    NeedSource,
    Record,
    Request,
    Response,
    clip_below,
    create_fork,
    export_fork,
    handle,
    offsets,
    plan_export,
    release_fork,
)

Z = offsets.encode(0)


def fork(s: Sim, path: str, source: str, ct: str | None = "text/plain", body=b"", **hdrs):
    return s.put(path, body, ct=ct, stream_forked_from=f"/v1/stream/{source}", **hdrs)


@pytest.fixture
def s() -> Sim:
    sim = Sim()
    sim.put("src", "first")
    sim.post("src", "second")
    return sim


def test_fork_at_tail_by_default(s):
    r = fork(s, "f", "src")
    assert r.status == 201
    assert hdr(r, "stream-next-offset") == offsets.encode(11)
    assert hdr(r, "stream-forked-from") is None and hdr(r, "stream-closed") is None
    assert s.read_all("f") == b"firstsecond"
    st = s.states["f"]
    assert st.fork.source == "src" and st.fork.position == 11 and st.fork.ref == "ref1"
    assert s.states["src"].refcount == 1


def test_fork_at_offsets(s):
    for off, want in (
        (Z, b""),
        (offsets.encode(5), b"first"),
        (offsets.encode(11), b"firstsecond"),
    ):
        path = f"f{off}"
        assert fork(s, path, "src", stream_fork_offset=off).status == 201
        r = s.get(path)
        assert r.body == want and hdr(r, "stream-up-to-date") == "true"
    assert fork(s, "fm1", "src", stream_fork_offset="-1").status == 201
    assert s.read_all("fm1") == b""


def test_fork_is_isolated_from_source(s):
    fork(s, "f", "src")
    s.post("src", " after")
    s.post("f", " fork")
    assert s.read_all("src") == b"firstsecond after"
    assert s.read_all("f") == b"firstsecond fork"
    assert s.get("f", f"offset={offsets.encode(11)}").body == b" fork"


def test_fork_errors_change_nothing(s):
    before = dict(s.states)
    cases = [
        (dict(stream_fork_offset="9999999999999999_9999999999999999"), 400),
        (dict(stream_fork_offset=offsets.encode(12)), 400),
        (dict(stream_fork_offset="garbage"), 400),
        (dict(stream_fork_offset=Z, stream_fork_sub_offset="-1"), 400),
        (dict(stream_fork_offset=Z, stream_fork_sub_offset="05"), 400),
        (dict(stream_fork_offset=Z, stream_fork_sub_offset="6"), 400),  # past "first"
        (dict(stream_fork_sub_offset="1"), 400),  # default anchor is the tail
        (dict(ct="application/json"), 409),
    ]
    for kw, status in cases:
        kw = dict(kw)
        ct = kw.pop("ct", "text/plain")
        r = fork(s, "f", "src", ct=ct, **kw)
        assert r.status == status, kw
    assert fork(s, "f", "nonexistent").status == 404
    assert s.states == before and "f" not in s.records


def test_rejected_fork_does_not_leak_a_reference(s):
    assert fork(s, "f", "src", ct="application/json").status == 409
    assert s.states["src"].refcount == 0
    s.request("DELETE", "src")
    assert s.request("HEAD", "src").status == 404


def test_bad_json_body_after_export_releases_the_reference():
    s = Sim()
    s.put("j", "[1,2]", ct="application/json")
    r = fork(s, "f", "j", ct=None, body="{bad")  # type unknown until the export arrives
    assert r.status == 400
    assert s.states["j"].refcount == 0 and s.released == ["j"]
    assert fork(s, "f2", "j", ct="application/json", body="{bad").status == 400
    assert s.released == ["j"] and s.states["j"].refcount == 0


def test_fork_target_in_use(s):
    s.put("taken", ct="application/json")
    assert fork(s, "taken", "src").status == 409
    assert s.states["src"].refcount == 0


def test_idempotent_fork(s):
    assert fork(s, "f", "src").status == 201
    assert fork(s, "f", "src").status == 200
    assert fork(s, "f", "src", ct=None).status == 200
    assert fork(s, "f", "src", stream_fork_offset=offsets.encode(11)).status == 200
    assert fork(s, "f", "src", stream_fork_offset=offsets.encode(5)).status == 409
    assert fork(s, "f", "other").status == 409
    assert s.put("f").status == 409  # a plain create does not match a fork
    assert s.states["src"].refcount == 1


def test_sub_offset_zero_equals_absent(s):
    assert fork(s, "f", "src", stream_fork_offset=Z).status == 201
    assert fork(s, "f", "src", stream_fork_offset=Z, stream_fork_sub_offset="0").status == 200


def test_binary_sub_offsets():
    s = Sim()
    s.put("src", "hello")
    r = fork(s, "f", "src", stream_fork_offset=Z, stream_fork_sub_offset="3")
    assert r.status == 201 and hdr(r, "stream-next-offset") == offsets.encode(3)
    assert s.read_all("f") == b"hel"
    r = s.get("f", f"offset={offsets.encode(3)}")
    assert r.body == b"" and hdr(r, "stream-up-to-date") == "true"
    assert s.post("f", "LO").status == 204
    assert s.read_all("f") == b"helLO"
    assert fork(s, "f", "src", stream_fork_offset=Z, stream_fork_sub_offset="3").status == 200
    assert fork(s, "f", "src", stream_fork_offset=Z, stream_fork_sub_offset="2").status == 409
    assert fork(s, "g", "src", stream_fork_offset=Z, stream_fork_sub_offset="5").status == 201
    assert s.read_all("g") == b"hello"
    assert (
        fork(s, "h", "src", stream_fork_offset=Z, stream_fork_sub_offset="3", body="XY").status
        == 201
    )
    assert s.read_all("h") == b"helXY"


def test_sub_offset_anchored_mid_stream(s):
    r = fork(s, "f", "src", stream_fork_offset=offsets.encode(5), stream_fork_sub_offset="3")
    assert r.status == 201 and s.read_all("f") == b"firstsec"


def test_sub_offset_on_empty_source():
    s = Sim()
    s.put("e")
    assert fork(s, "f", "e", stream_fork_offset=Z, stream_fork_sub_offset="1").status == 400


def test_json_sub_offsets():
    s = Sim()
    s.put("j", '[{"a":1},{"b":2},{"c":3},{"d":4}]', ct="application/json")
    r = fork(s, "f", "j", ct="application/json", stream_fork_offset=Z, stream_fork_sub_offset="2")
    assert r.status == 201 and jbody(s.get("f")) == [{"a": 1}, {"b": 2}]
    assert (
        fork(s, "g", "j", ct=None, stream_fork_offset=Z, stream_fork_sub_offset="4").status == 201
    )
    assert len(jbody(s.get("g"))) == 4
    assert (
        fork(s, "h", "j", ct=None, stream_fork_offset=Z, stream_fork_sub_offset="5").status == 400
    )
    r = fork(s, "i", "j", ct=None, stream_fork_offset=Z, stream_fork_sub_offset="1")
    assert hdr(r, "content-type") == "application/json"
    s.post("i", '[{"x":9}]', ct="application/json")
    assert jbody(s.get("i")) == [{"a": 1}, {"x": 9}]


def test_fork_does_not_inherit_writer_state():
    s = Sim()
    s.put("src", ct="application/json")
    prod = dict(producer_id="P", producer_epoch="0", producer_seq="0")
    assert s.post("src", '[{"i":1},{"i":2},{"i":3}]', ct="application/json", **prod).status == 200
    s.post("src", "[4]", ct="application/json", stream_seq="5")
    fork(s, "f", "src", ct=None, stream_fork_offset=Z, stream_fork_sub_offset="1")
    st = s.states["f"]
    assert st.producers == {} and st.last_stream_seq is None and st.closed_by is None
    assert s.post("f", '[{"i":99}]', ct="application/json", **prod).status == 200
    assert s.post("f", "[5]", ct="application/json", stream_seq="1").status == 204
    assert jbody(s.get("f"))[:2] == [{"i": 1}, {"i": 99}]


def test_fork_of_closed_source_starts_open():
    s = Sim()
    s.put("src", "hello", stream_closed="true")
    r = fork(s, "f", "src")
    assert r.status == 201 and hdr(r, "stream-closed") is None
    assert s.post("f", " fork data").status == 204
    assert fork(s, "g", "src", stream_fork_offset=Z, stream_fork_sub_offset="3").status == 201
    assert s.read_all("g") == b"hel"


def test_fork_created_closed_on_request(s):
    r = fork(s, "f", "src", stream_closed="true")
    assert r.status == 201 and hdr(r, "stream-closed") == "true"


def test_closing_fork_leaves_source_open(s):
    fork(s, "f", "src")
    s.post("f", "", ct=None, stream_closed="true")
    assert hdr(s.request("HEAD", "src"), "stream-closed") is None


def test_recursive_forks_and_sub_offset_composition():
    s = Sim()
    s.put("l0", "abcdef")
    fork(s, "l1", "l0", stream_fork_offset=Z, stream_fork_sub_offset="4")
    assert s.read_all("l1") == b"abcd"
    fork(s, "l2", "l1", stream_fork_offset=Z, stream_fork_sub_offset="2")
    assert s.read_all("l2") == b"ab"
    s.post("l2", "Z")
    assert s.read_all("l2") == b"abZ"
    s.put("x0", "X")
    fork(s, "x1", "x0")
    s.post("x1", "Y")
    fork(s, "x2", "x1")
    s.post("x2", "Z")
    s.post("x0", "0")
    s.post("x1", "1")
    assert (s.read_all("x0"), s.read_all("x1"), s.read_all("x2")) == (b"X0", b"XY1", b"XYZ")


def test_soft_delete_and_cascading_gc_three_levels():
    s = Sim()
    s.put("l0", "root")
    fork(s, "l1", "l0")
    fork(s, "l2", "l1")
    assert s.request("DELETE", "l0").status == 204
    assert s.request("DELETE", "l1").status == 204
    assert s.request("HEAD", "l0").status == 410 and s.request("HEAD", "l1").status == 410
    assert fork(s, "l3", "l1").status == 409
    assert s.read_all("l2") == b"root"
    assert s.request("DELETE", "l2").status == 204
    assert s.states == {}


def test_deleting_middle_of_chain_preserves_data():
    s = Sim()
    s.put("l0", "A")
    fork(s, "l1", "l0")
    s.post("l1", "B")
    fork(s, "l2", "l1")
    s.post("l2", "C")
    s.request("DELETE", "l1")
    assert s.read_all("l2") == b"ABC" and s.read_all("l0") == b"A"


def test_many_forks_refcount():
    s = Sim()
    s.put("src", "shared data")
    for i in range(10):
        assert fork(s, f"f{i}", "src").status == 201
    assert s.states["src"].refcount == 10
    for i in range(10):
        s.request("DELETE", f"f{i}")
    assert s.states["src"].refcount == 0 and s.read_all("src") == b"shared data"


def test_replacing_an_expired_fork_releases_its_reference():
    s = Sim()
    s.put("src", "x")
    fork(s, "f", "src", stream_ttl="1")
    s.now += 2
    assert s.put("f").status == 201
    assert s.states["src"].refcount == 0


def test_fork_ttl_inheritance():
    s = Sim()
    s.put("ttl", "d", stream_ttl="3600")
    s.put("exp", "d", stream_expires_at="2030-01-01T00:00:00Z")
    s.put("none", "d")
    fork(s, "a", "ttl")
    assert hdr(s.request("HEAD", "a"), "stream-ttl") == "3600"
    fork(s, "b", "ttl", stream_ttl="7200")
    assert hdr(s.request("HEAD", "b"), "stream-ttl") == "7200"
    fork(s, "c", "exp")
    r = s.request("HEAD", "c")
    assert hdr(r, "stream-expires-at") == "2030-01-01T00:00:00Z" and hdr(r, "stream-ttl") is None
    fork(s, "d", "exp", stream_ttl="60")
    r = s.request("HEAD", "d")
    assert hdr(r, "stream-ttl") == "60" and hdr(r, "stream-expires-at") is None
    fork(s, "e", "ttl", stream_expires_at="2031-01-01T00:00:00Z")
    r = s.request("HEAD", "e")
    assert hdr(r, "stream-ttl") is None and hdr(r, "stream-expires-at")
    fork(s, "g", "none")
    r = s.request("HEAD", "g")
    assert hdr(r, "stream-ttl") is None and hdr(r, "stream-expires-at") is None
    assert fork(s, "a", "ttl").status == 200  # inherited TTL still matches a bare re-PUT
    assert fork(s, "b", "ttl", stream_ttl="7201").status == 409


def test_fork_outlives_source_via_its_own_ttl():
    s = Sim()
    s.put("src", "source data", stream_ttl="2")
    fork(s, "f", "src", stream_ttl="2")
    s.now += 1.5
    assert s.get("f").status == 200
    s.now += 0.5
    assert s.request("HEAD", "src").status == 410
    s.alarm()
    assert s.states["src"].soft_deleted
    assert s.request("HEAD", "f").status == 200
    s.now += 1.6
    s.alarm()
    assert s.states == {}


def test_two_phase_api_directly(s):
    req = Request(
        "PUT", "f", "", {"stream-forked-from": "/v1/stream/src", "content-type": "text/plain"}
    )
    need = handle(req, None, s.now, s.config)
    assert need == NeedSource("src", None, 0, "text/plain")
    src = s.states["src"]
    assert plan_export(src, None, 0, s.now, s.config) == 11
    assert plan_export(src, Z, 0, s.now, s.config) == 0
    assert plan_export(src, offsets.encode(5), 2, s.now, s.config) == 5
    assert plan_export(None, None, 0, s.now, s.config).status == 404
    err = plan_export(src, None, 0, s.now, s.config, content_type="application/json")
    assert isinstance(err, Response) and err.status == 409
    holder = s.records["src"][1]  # "second", the record holding the anchor 5
    export, new_src = export_fork(src, offsets.encode(5), 2, [holder], s.now, s.config)
    assert isinstance(export, ForkExport)
    assert export.position == 7 and export.offset == offsets.encode(5)
    assert new_src.refcount == src.refcount + 1
    reply = create_fork(req, Response(404, (), b"nope"), s.now, s.config)
    assert reply.response.status == 404 and not reply.changed
    reply = create_fork(req, export, s.now, s.config, ref="r9")
    assert reply.changed and reply.fresh and reply.state.tail == 7
    assert reply.state.fork.ref == "r9" and reply.state.fork.linked
    assert reply.records == ()  # the inherited data stays on the source


def test_export_reads_no_records_without_a_sub_offset(s):
    src = s.states["src"]
    out = export_fork(src, offsets.encode(5), 0, [], s.now, s.config)
    export, _ = out
    assert export.position == 5


def test_negative_sub_offset_from_a_peer_is_refused(s):
    src = s.states["src"]
    assert plan_export(src, offsets.encode(5), -1, s.now, s.config).status == 400
    out = export_fork(src, offsets.encode(5), -1, [], s.now, s.config)
    assert isinstance(out, Response) and out.status == 400


def test_sub_offset_without_its_anchor_record_is_refused(s):
    src = s.states["src"]
    out = export_fork(src, offsets.encode(5), 2, [], s.now, s.config)
    assert isinstance(out, Response) and out.status == 400


def test_fork_stores_only_its_own_records():
    s = Sim()
    s.put("src", "x" * 1000)
    s.post("src", "y" * 1000)
    assert fork(s, "f", "src", body=b"own").status == 201
    assert [(r.start, r.end) for r in s.records["f"]] == [(2000, 2003)]
    assert s.read_all("f") == b"x" * 1000 + b"y" * 1000 + b"own"
    s.post("src", "later")
    assert s.read_all("f") == b"x" * 1000 + b"y" * 1000 + b"own"


def test_linked_reads_are_chunked_and_resume_across_the_divergence_point():
    s = Sim(config=CoreConfig(max_read_bytes=4))
    s.put("src", "abcd")
    s.post("src", "efgh")
    s.post("src", "ijkl")
    fork(s, "f", "src", stream_fork_offset=offsets.encode(4), stream_fork_sub_offset="2")
    s.post("f", "XY")
    r = s.get("f", "offset=-1")
    assert r.body == b"abcd" and hdr(r, "stream-next-offset") == offsets.encode(4)
    r = s.get("f", f"offset={offsets.encode(5)}")
    assert r.body == b"fXY" and hdr(r, "stream-next-offset") == offsets.encode(8)
    assert s.read_all("f") == b"abcdefXY"


def test_json_fork_reads_clip_the_source_record_at_a_message_boundary():
    s = Sim()
    s.put("src", b'[{"a":1},{"b":[2,3]},"c,d"]', ct="application/json")
    fork(
        s,
        "f",
        "src",
        ct="application/json",
        stream_fork_offset=Z,
        stream_fork_sub_offset="2",
    )
    s.post("f", b'["own"]', ct="application/json")
    assert jbody(s.get("f", "offset=-1")) == [{"a": 1}, {"b": [2, 3]}, "own"]
    r = s.get("f", f"offset={offsets.encode(1)}")
    assert jbody(r) == [{"b": [2, 3]}, "own"]


def test_clip_below():
    recs = [Record(0, 3, b"abc"), Record(3, 6, b"def"), Record(6, 9, b"ghi")]
    assert clip_below(recs, 9, False) == recs
    assert clip_below(recs, 4, False) == [Record(0, 3, b"abc"), Record(3, 4, b"d")]
    assert clip_below(recs, 3, False) == [Record(0, 3, b"abc")]
    assert clip_below(recs[1:], 3, False) == []
    json_recs = [Record(0, 3, b'1,{"x":"a,b"},[3]')]
    assert clip_below(json_recs, 2, True) == [Record(0, 2, b'1,{"x":"a,b"}')]


def test_release_fork():
    s = Sim()
    s.put("src")
    fork(s, "f", "src")
    st = s.states["src"]
    assert release_fork(st, s.now).refcount == 0
    assert release_fork(None, s.now) is None
    s.request("DELETE", "src")
    assert release_fork(s.states["src"], s.now) is None
