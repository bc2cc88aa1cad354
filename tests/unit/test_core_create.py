"""PUT: create, idempotent re-create, initial body, closure on create (PROTOCOL.md 5.1)."""

from coresim import Sim, hdr, jbody

from ds_cluster.shard.core import offsets


def test_create_returns_201_with_headers():
    s = Sim()
    r = s.put("a", host="example.com:4437")
    assert r.status == 201
    assert hdr(r, "content-type") == "text/plain"
    assert hdr(r, "stream-next-offset") == offsets.encode(0)
    assert hdr(r, "location") == "http://example.com:4437/v1/stream/a"
    assert hdr(r, "stream-closed") is None
    assert s.states["a"].created_at == s.now and s.states["a"].last_access == s.now


def test_location_without_host_is_the_path():
    r = Sim().put("x/y z")
    assert hdr(r, "location") == "/v1/stream/x/y%20z"


def test_idempotent_create_and_conflicts():
    s = Sim()
    assert s.put("a", stream_ttl="3600").status == 201
    r = s.put("a", stream_ttl="3600")
    assert r.status == 200 and hdr(r, "location") is None
    assert s.put("a", ct="TEXT/PLAIN", stream_ttl="3600").status == 200
    assert s.put("a", ct="text/plain; charset=utf-8", stream_ttl="3600").status == 200
    assert s.put("a", stream_ttl="7200").status == 409
    assert s.put("a").status == 409  # TTL differs (none)
    assert s.put("a", ct="application/json", stream_ttl="3600").status == 409
    assert s.put("a", ct=None, stream_ttl="3600").status == 409  # default octet-stream


def test_idempotent_create_ignores_body_and_keeps_data():
    s = Sim()
    s.put("a", "first")
    assert s.put("a", "second").status == 200
    assert s.read_all("a") == b"first"


def test_expires_at_idempotency_compares_instants():
    s = Sim()
    assert s.put("a", stream_expires_at="2030-01-01T00:00:00Z").status == 201
    assert s.put("a", stream_expires_at="2030-01-01T00:00:00+00:00").status == 200
    assert s.put("a", stream_expires_at="2030-01-01T00:00:01Z").status == 409


def test_closure_status_participates_in_idempotency():
    s = Sim()
    s.put("open")
    assert s.put("open", stream_closed="true").status == 409
    r = s.put("closed", stream_closed="true")
    assert r.status == 201 and hdr(r, "stream-closed") == "true"
    assert s.put("closed").status == 409
    r = s.put("closed", stream_closed="true")
    assert r.status == 200 and hdr(r, "stream-closed") == "true"


def test_create_closed_with_body():
    s = Sim()
    r = s.put("a", "initial content", stream_closed="TRUE")
    assert r.status == 201 and hdr(r, "stream-closed") == "true"
    r = s.get("a")
    assert r.body == b"initial content" and hdr(r, "stream-closed") == "true"


def test_create_without_content_type_defaults():
    s = Sim()
    r = s.put("a", b"\x00\x01", ct=None)
    assert r.status == 201 and hdr(r, "content-type") == "application/octet-stream"


def test_create_with_initial_body_sets_tail():
    s = Sim()
    r = s.put("a", "initial stream content")
    assert hdr(r, "stream-next-offset") == offsets.encode(22)
    assert s.read_all("a") == b"initial stream content"


def test_json_create_empty_array_and_batches():
    s = Sim()
    r = s.put("e", "[]", ct="application/json")
    assert r.status == 201 and s.states["e"].tail == 0 and s.records["e"] == []
    assert s.get("e").body == b"[]"
    s.put("b", '[{"a":1},{"b":2}]', ct="application/json")
    assert s.states["b"].tail == 2
    assert jbody(s.get("b")) == [{"a": 1}, {"b": 2}]
    s.put("o", '{"x": 1}', ct="application/json")
    assert jbody(s.get("o")) == [{"x": 1}]


def test_invalid_create_changes_nothing():
    s = Sim()
    cases = [
        dict(stream_ttl="abc"),
        dict(stream_ttl="-1"),
        dict(stream_ttl="00060"),
        dict(stream_ttl="60.5"),
        dict(stream_ttl="1e3"),
        dict(stream_ttl="+60"),
        dict(stream_expires_at="not-a-timestamp"),
        dict(stream_ttl="60", stream_expires_at="2030-01-01T00:00:00Z"),
        dict(stream_fork_sub_offset="0"),
        dict(stream_fork_offset=offsets.encode(0)),
        dict(ct="garbage"),
    ]
    for hdrs in cases:
        kw = dict(hdrs)
        ct = kw.pop("ct", "text/plain")
        r = s.put("a", ct=ct, **kw)
        assert r.status == 400, hdrs
        assert r.body and hdr(r, "content-type").startswith("text/plain")
    assert s.put("j", "{bad", ct="application/json").status == 400
    assert s.states == {} and s.records == {}


def test_recreate_after_delete_is_fresh():
    s = Sim()
    s.put("a", "old data")
    s.post("a", " more old data")
    assert s.request("DELETE", "a").status == 204
    assert "a" not in s.states
    r = s.put("a", "new data")
    assert r.status == 201
    r = s.get("a")
    assert r.body == b"new data" and hdr(r, "stream-up-to-date") == "true"


def test_head_after_create():
    s = Sim()
    s.put("a", "test data", stream_ttl="3600")
    r = s.request("HEAD", "a")
    assert r.status == 200 and r.body == b""
    assert hdr(r, "content-type") == "text/plain"
    assert hdr(r, "stream-next-offset") == offsets.encode(9)
    assert hdr(r, "stream-ttl") == "3600"
    assert hdr(r, "cache-control") == "no-store"
    assert hdr(r, "stream-closed") is None
    s.put("b", stream_expires_at="2030-01-01T00:00:00Z")
    assert hdr(s.request("HEAD", "b"), "stream-expires-at") == "2030-01-01T00:00:00Z"
    assert s.request("HEAD", "nope").status == 404


def test_unknown_method():
    s = Sim()
    s.put("a")
    r = s.request("PATCH", "a")
    assert r.status == 405 and hdr(r, "allow")


def test_conflicts_name_what_differs():
    s = Sim()
    assert s.put("a", stream_ttl="3600").status == 201
    r = s.put("a", stream_ttl="7200")
    assert r.status == 409 and r.body.endswith(b": Stream-TTL")
    r = s.put("a", ct="application/json", stream_ttl="3600")
    assert r.status == 409 and r.body.endswith(b": Content-Type")
    r = s.post("a", "x", ct="application/json")
    assert r.status == 409 and b"(text/plain)" in r.body
