"""TTL / Expires-At (5.1), expiry alarm, DELETE and soft-delete (5.4), HEAD (5.5)."""

from coresim import Sim, hdr

from ds_cluster.shard.core import Reply, expire


def test_ttl_expiry_makes_stream_absent():
    s = Sim()
    s.put("a", "data", stream_ttl="1")
    assert s.request("HEAD", "a").status == 200
    s.now += 1
    for method in ("HEAD", "GET", "DELETE"):
        assert s.request(method, "a").status == 404
    assert s.post("a", "more").status == 404
    assert s.get("a", "offset=now&live=long-poll").status == 404


def test_head_does_not_refresh_ttl_but_reads_and_writes_do():
    s = Sim()
    s.put("a", stream_ttl="2")
    s.now += 1.5
    assert s.request("HEAD", "a").status == 200
    assert s.states["a"].last_access == s.now - 1.5
    s.now += 0.5
    assert s.request("HEAD", "a").status == 404

    s.put("b", stream_ttl="2")
    s.now += 1.5
    assert s.post("b", "keep alive").status == 204
    s.now += 1.5
    assert s.request("HEAD", "b").status == 200
    assert s.get("b", "offset=now").status == 200
    s.now += 1.5
    assert s.post("b", "", ct=None, stream_closed="true").status == 204
    s.now += 1.5
    r = s.request("HEAD", "b")
    assert r.status == 200 and hdr(r, "stream-closed") == "true"
    s.now += 0.4
    assert s.get("b").status == 200
    s.now += 1.9
    assert s.request("HEAD", "b").status == 200


def test_producer_close_refreshes_ttl():
    s = Sim()
    s.put("a", stream_ttl="2")
    s.now += 1.5
    r = s.post(
        "a",
        "",
        ct=None,
        stream_closed="true",
        producer_id="p",
        producer_epoch="0",
        producer_seq="0",
    )
    assert r.status == 204
    s.now += 1.5
    assert s.request("HEAD", "a").status == 200


def test_expires_at_is_absolute():
    s = Sim()
    s.put("a", "x", stream_expires_at="2027-01-15T08:00:04Z")
    deadline = s.states["a"].expires_at_ts
    assert s.states["a"].deadline() == deadline
    s.now = deadline - 1
    assert s.get("a").status == 200
    s.now = deadline
    assert s.get("a").status == 404


def test_recreate_after_expiry_is_fresh():
    s = Sim()
    s.put("a", "original data", stream_ttl="1")
    s.now += 2
    r = s.put("a", '["new data"]', ct="application/json", stream_ttl="3600")
    assert r.status == 201
    assert s.get("a").body == b'["new data"]'


def test_expire_alarm():
    s = Sim()
    s.put("a", stream_ttl="10")
    s.put("b")
    assert expire(s.states["a"], s.now + 9) is None
    assert expire(s.states["b"], s.now + 1e9) is None
    assert expire(None, s.now) is None
    reply = expire(s.states["a"], s.now + 10)
    assert isinstance(reply, Reply) and reply.changed and reply.state is None
    s.now += 10
    s.alarm()
    assert "a" not in s.states and "b" in s.states


def test_expiry_with_forks_soft_deletes():
    s = Sim()
    s.put("src", "data", stream_ttl="1")
    s.put("fork", ct=None, stream_forked_from="/v1/stream/src", stream_ttl="100")
    s.now += 1
    assert s.request("HEAD", "src").status == 410
    assert s.put("src").status == 409
    s.alarm()
    assert s.states["src"].soft_deleted and s.states["src"].refcount == 1
    assert s.states["src"].deadline() is None  # no alarm re-arms on a soft-deleted stream
    assert expire(s.states["src"], s.now + 100) is None
    s.alarm()  # idempotent
    assert s.get("fork").body == b"data"
    assert s.request("DELETE", "fork").status == 204
    assert "src" not in s.states  # cascade


def test_delete():
    s = Sim()
    assert s.request("DELETE", "a").status == 404
    s.put("a", "content")
    s.post("a", "", ct=None, stream_closed="true")
    assert s.request("DELETE", "a").status == 204
    assert "a" not in s.states and "a" not in s.records
    assert s.request("HEAD", "a").status == 404


def test_soft_delete_lifecycle():
    s = Sim()
    s.put("src", "data")
    s.put("f", ct=None, stream_forked_from="/v1/stream/src")
    assert s.request("DELETE", "src").status == 204
    assert s.states["src"].soft_deleted
    for method in ("HEAD", "GET", "DELETE"):
        assert s.request(method, "src").status == 410
    assert s.post("src", "x").status == 410
    assert s.put("src").status == 409
    assert s.get("f").body == b"data"
    assert s.request("DELETE", "f").status == 204
    assert "src" not in s.states
    assert s.request("HEAD", "src").status == 404
