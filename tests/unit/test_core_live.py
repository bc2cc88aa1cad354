"""Live reads: long-poll (5.7) and SSE (5.8), cursors (10.1)."""

import base64
import json

import pytest
from coresim import Sim, hdr

from ds_cluster.shard.core import (
    CoreConfig,
    Reply,
    Request,
    Wait,
    handle,
    offsets,
)
from ds_cluster.shard.core.sse import data_event

TAIL5 = offsets.encode(5)


@pytest.fixture
def s() -> Sim:
    sim = Sim()
    sim.put("a", "hello")
    return sim


def test_long_poll_returns_existing_data_immediately(s):
    r = s.get("a", "offset=-1&live=long-poll")
    assert r.status == 200 and r.body == b"hello"
    assert hdr(r, "stream-up-to-date") == "true"
    assert hdr(r, "stream-cursor").isdigit()
    assert s.waits == []


def test_long_poll_waits_then_gets_data(s):
    r = s.get("a", f"offset={TAIL5}&live=long-poll", during_wait=lambda: s.post("a", " new"))
    assert s.waits == [Wait(5, s.config.long_poll_timeout)]
    assert r.status == 200 and r.body == b" new"
    assert hdr(r, "stream-next-offset") == offsets.encode(9)
    assert hdr(r, "stream-cursor")


def test_long_poll_timeout_is_204(s):
    t0 = s.now
    r = s.get("a", f"offset={TAIL5}&live=long-poll")
    assert s.now == t0 + s.config.long_poll_timeout
    assert r.status == 204 and r.body == b""
    assert hdr(r, "stream-next-offset") == TAIL5
    assert hdr(r, "stream-up-to-date") == "true"
    assert hdr(r, "stream-cursor").isdigit()
    assert hdr(r, "stream-closed") is None


def test_long_poll_offset_now_keeps_its_position(s):
    r = s.get("a", "offset=now&live=long-poll")
    assert r.status == 204 and hdr(r, "stream-next-offset") == TAIL5
    r = s.get("a", "offset=now&live=long-poll", during_wait=lambda: s.post("a", "new data"))
    assert r.status == 200 and r.body == b"new data"


def test_long_poll_closed_at_tail_returns_immediately(s):
    s.post("a", "", ct=None, stream_closed="true")
    for q in (f"offset={TAIL5}&live=long-poll", "offset=now&live=long-poll"):
        r = s.get("a", q)
        assert r.status == 204
        assert hdr(r, "stream-closed") == "true" and hdr(r, "stream-up-to-date") == "true"
        assert hdr(r, "stream-next-offset") == TAIL5
    assert s.waits == []


def test_long_poll_woken_by_close(s):
    r = s.get(
        "a",
        f"offset={TAIL5}&live=long-poll",
        during_wait=lambda: s.post("a", "", ct=None, stream_closed="true"),
    )
    assert r.status == 204 and hdr(r, "stream-closed") == "true"


def test_long_poll_woken_by_final_append_and_close(s):
    r = s.get(
        "a",
        f"offset={TAIL5}&live=long-poll",
        during_wait=lambda: s.post("a", "bye", stream_closed="true"),
    )
    assert r.status == 200 and r.body == b"bye" and hdr(r, "stream-closed") == "true"


def test_long_poll_stream_deleted_during_wait(s):
    r = s.get("a", f"offset={TAIL5}&live=long-poll", during_wait=lambda: s.request("DELETE", "a"))
    assert r.status == 404


def test_long_poll_cursor_collision_jitters(s):
    r1 = s.get("a", "offset=-1&live=long-poll")
    c1 = int(hdr(r1, "stream-cursor"))
    r2 = s.get("a", f"offset=-1&live=long-poll&cursor={c1}")
    assert int(hdr(r2, "stream-cursor")) > c1


def test_long_poll_spurious_wake_answers_204(s):
    req = Request("GET", "a", f"offset={TAIL5}&live=long-poll")
    w = handle(req, s.states["a"], s.now, s.config)
    assert isinstance(w, Wait)
    d = handle(req, s.states["a"], s.now + 1, s.config, resume=w)
    assert isinstance(d, Reply) and d.response.status == 204


# ---------------------------------------------------------------------------------------
# SSE


def events(raw: bytes) -> list[tuple[str, str]]:
    out = []
    text = raw.decode().replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        etype, data = "", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                etype = line[6:].strip()
            elif line.startswith("data:"):
                c = line[5:]
                data.append(c[1:] if c.startswith(" ") else c)
        out.append((etype, "\n".join(data)))
    return out


def sse(s: Sim, path: str, query: str):
    r = s.get(path, query)
    assert r.status == 200, r
    return r, s.last_sse


def step(s: Sim, path: str, session) -> bytes:
    recs = s.fetch(path, session.position, s.config.max_read_bytes)
    return session.step(s.states.get(path), recs, s.now)


def test_sse_head_and_catch_up(s):
    s.post("a", " world")
    r, sess = sse(s, "a", "offset=-1&live=sse")
    assert ("content-type", "text/event-stream") in r.headers
    assert hdr(r, "cache-control") == "no-cache"
    assert hdr(r, "stream-sse-data-encoding") is None
    assert sess.ends_at == s.now + s.config.sse_max_duration
    ev = events(step(s, "a", sess))
    assert ev[0] == ("data", "hello world")
    ctl = json.loads(ev[1][1])
    assert ev[1][0] == "control"
    assert ctl["streamNextOffset"] == offsets.encode(11) and ctl["upToDate"] is True
    assert ctl["streamCursor"].isdigit()
    assert not sess.done and step(s, "a", sess) == b""  # nothing new: silent
    s.post("a", "!")
    ev = events(step(s, "a", sess))
    assert ev[0] == ("data", "!") and json.loads(ev[1][1])["streamNextOffset"] == offsets.encode(12)


def test_sse_empty_stream_and_offset_now(s):
    s.put("e")
    _, sess = sse(s, "e", "offset=-1&live=sse")
    ev = events(step(s, "e", sess))
    assert len(ev) == 1 and ev[0][0] == "control"
    assert json.loads(ev[0][1]) == {
        "streamNextOffset": offsets.encode(0),
        "streamCursor": json.loads(ev[0][1])["streamCursor"],
        "upToDate": True,
    }
    _, sess = sse(s, "a", "offset=now&live=sse")
    ev = events(step(s, "a", sess))
    assert [e[0] for e in ev] == ["control"]
    assert json.loads(ev[0][1])["streamNextOffset"] == TAIL5


def test_sse_closed_stream(s):
    s.post("a", "", ct=None, stream_closed="true")
    _, sess = sse(s, "a", "offset=-1&live=sse")
    ev = events(step(s, "a", sess))
    assert ev[0] == ("data", "hello")
    ctl = json.loads(ev[1][1])
    assert ctl["streamClosed"] is True and "streamCursor" not in ctl
    assert sess.done and step(s, "a", sess) == b""
    _, sess = sse(s, "a", f"offset={TAIL5}&live=sse")
    ev = events(step(s, "a", sess))
    assert len(ev) == 1 and json.loads(ev[0][1])["streamClosed"] is True and sess.done


def test_sse_live_reader_gets_final_append_before_close(s):
    _, sess = sse(s, "a", f"offset={TAIL5}&live=sse")
    step(s, "a", sess)
    s.post("a", "sse-data", stream_closed="true")
    ev = events(step(s, "a", sess))
    assert ev[0] == ("data", "sse-data")
    assert json.loads(ev[1][1])["streamClosed"] is True and sess.done


def test_sse_json_wraps_arrays_and_pairs_controls():
    s = Sim()
    s.put("j", '[{"n":1}]', ct="application/json")
    s.post("j", '[{"n":2}]', ct="application/json")
    _, sess = sse(s, "j", "offset=-1&live=sse")
    ev = events(step(s, "j", sess))
    assert [e[0] for e in ev] == ["data", "control"]
    assert json.loads(ev[0][1]) == [{"n": 1}, {"n": 2}]


def test_sse_base64_for_binary():
    s = Sim()
    s.put("b", bytes([0, 1, 2, 3]), ct="application/octet-stream")
    s.post("b", bytes([4, 5, 6, 0x0A]), ct="application/octet-stream")
    r, sess = sse(s, "b", "offset=-1&live=sse")
    assert hdr(r, "stream-sse-data-encoding") == "base64"
    ev = events(step(s, "b", sess))
    assert base64.b64decode(ev[0][1]) == bytes([0, 1, 2, 3, 4, 5, 6, 10])
    assert "streamCursor" in json.loads(ev[1][1])
    s.put("p", b"\x89PNG", ct="image/png")
    assert hdr(sse(s, "p", "offset=-1&live=sse")[0], "stream-sse-data-encoding") == "base64"


def test_sse_injection_is_impossible():
    s = Sim()
    payloads = [
        'safe content\r\n\r\nevent: control\r\ndata: {"injected":true}\r\n\r\nmore',
        "start\n\nevent: data\ndata: fake-event\n\nend",
        'start\r\revent: control\rdata: {"cr_injected":true}\r\rend',
    ]
    for i, p in enumerate(payloads):
        s.put(f"t{i}", p)
        _, sess = sse(s, f"t{i}", "offset=-1&live=sse")
        ev = events(step(s, f"t{i}", sess))
        assert [e[0] for e in ev] == ["data", "control"]
        assert "injected" not in ev[1][1]
    raw = data_event(b"line1\nline2\nline3")
    assert b"data:line1\ndata:line2\ndata:line3\n\n" in raw
    assert events(data_event(b" leading space"))[0][1] == " leading space"


def test_sse_cursor_collision(s):
    _, sess = sse(s, "a", "offset=-1&live=sse")
    c1 = int(json.loads(events(step(s, "a", sess))[-1][1])["streamCursor"])
    _, sess = sse(s, "a", f"offset=-1&live=sse&cursor={c1}")
    c2 = int(json.loads(events(step(s, "a", sess))[-1][1])["streamCursor"])
    assert c2 > c1


def test_sse_offsets_strictly_increase(s):
    _, sess = sse(s, "a", "offset=-1&live=sse")
    seen = []
    for i in range(5):
        for e in events(step(s, "a", sess)):
            if e[0] == "control":
                seen.append(json.loads(e[1])["streamNextOffset"])
        s.post("a", f"m{i}")
    assert seen == sorted(set(seen))


def test_sse_ends_on_delete_recreate_and_deadline(s):
    _, sess = sse(s, "a", "offset=-1&live=sse")
    step(s, "a", sess)
    s.request("DELETE", "a")
    assert step(s, "a", sess) == b"" and sess.done
    s.put("a", "hello")
    _, sess = sse(s, "a", "offset=-1&live=sse")
    step(s, "a", sess)
    s.request("DELETE", "a")
    s.now += 1
    s.put("a", "other")
    assert step(s, "a", sess) == b"" and sess.done
    _, sess = sse(s, "a", "offset=-1&live=sse")
    s.now = sess.ends_at
    assert step(s, "a", sess) and sess.done


def test_sse_chunked_catch_up():
    s = Sim(config=CoreConfig(max_read_bytes=4))
    s.put("a", "ab")
    for c in ("cd", "ef", "gh"):
        s.post("a", c)
    _, sess = sse(s, "a", "offset=-1&live=sse")
    got, controls = b"", []
    while sess.position < s.states["a"].tail:
        for et, data in events(step(s, "a", sess)):
            if et == "data":
                got += data.encode()
            else:
                controls.append(json.loads(data))
    assert got == b"abcdefgh"
    assert [c.get("upToDate", False) for c in controls] == [False, True]


def test_sse_from_inside_a_large_json_append_sends_exactly_what_follows():
    s = Sim()
    s.put("j", ct="application/json")
    n = 80_000
    s.post("j", "[" + ",".join(str(i) for i in range(n)) + "]", ct="application/json")
    assert len(s.records["j"]) > 1
    start = 12_345
    _, sess = sse(s, "j", f"offset={offsets.encode(start)}&live=sse")
    got: list[int] = []
    while not sess.done and sess.position < n:
        for et, data in events(step(s, "j", sess)):
            if et == "data":
                got += json.loads(data)
    assert got == list(range(start, n))
