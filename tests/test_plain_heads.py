"""Plain appends served from a kept head (`gateway.plain_heads`, `Http1Connection.read_here`).

A gateway's HTTP/1.1 server runs in this process over a socket pair, in front of a route
that answers every request with what it was given (method, target, headers, body) and a
count. The same bytes, written the same way, go to a server that keeps heads and to one
that keeps none (every request through llhttp): the client must read the same bytes and
the route see the same requests. Repeats of a kept head are served without llhttp; a
near miss (one byte of the head different, a body split over reads, a request pipelined
behind, a request id, Connection: close) goes through the parser.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_cluster.gateway.answers import Answer, NativeAnswer, error_answer
from ds_cluster.gateway.budget import OutputBudget
from ds_cluster.gateway.http1 import Http1Connection, Http1Server, _whole
from ds_cluster.gateway.plain_heads import MAX_HEAD_BYTES, MAX_HEADS, PlainHeads
from ds_cluster.gateway.server import Connections, LeanConfig

Seen = tuple[str, bytes, tuple[tuple[bytes, bytes], ...], bytes]


class EchoRoute:
    """A `NativeRoute` that answers each request with what it saw, numbered; appends
    through `send` / `send_append` get theirs from the loop's next batch, as a shard
    connection's reader would deliver it. Targets with "slow" are not sent on."""

    max_body_bytes = 1000

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        # Appends to targets with "deny" are refused per request (as a token that no
        # longer covers them is) once this many requests were seen.
        self.deny_after = 3

    def _answer(self, method: str, target: bytes, headers: Any, body: bytes) -> NativeAnswer:
        self.seen.append((method, target, tuple(headers), body))
        if b"/nc" in target:  # an append's answer: 204, its offset, no body
            return 204, b"stream-next-offset: %d\r\n" % len(self.seen), b""
        out = b"%d %b %b %r" % (len(self.seen), method.encode(), target, body)
        return 200, b"content-length: %d\r\n" % len(out), out

    def takes(self, method: str, target: bytes) -> str | None:
        return "answer" if target.startswith(b"/v1/stream/") else None

    async def answer(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        until_gone: Callable[[], Awaitable[None]],
        write_at_once: Callable[[Answer], None] | None = None,
    ) -> NativeAnswer | None:
        return self._answer(method, target, headers, body)

    async def stream(self, *args: Any) -> Answer:
        return error_answer(500, "no streams here")

    def send(
        self,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        arrived: Callable[[NativeAnswer | None], None],
    ) -> Any:
        plain = self.plain_append(target, headers)
        return None if plain is None else self.send_append(plain, body, arrived)

    def plain_append(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
        return None if b"slow" in target else (target, tuple(headers))

    def send_append(
        self, plain: Any, body: bytes, arrived: Callable[[NativeAnswer | None], None]
    ) -> Any:
        if b"deny" in plain[0] and len(self.seen) >= self.deny_after:
            return None  # `answer` serves it
        answer = self._answer("POST", plain[0], plain[1], body)
        trio.lowlevel.current_trio_token().run_sync_soon(arrived, answer)
        return answer

    async def settle(self, sent: Any) -> NativeAnswer:
        return sent  # type: ignore[no-any-return]

    def abandon(self, sent: Any) -> None:
        pass

    def error(self, status: int, message: str) -> Answer:
        return error_answer(status, message)

    def refuse(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        return None


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _no_hand_over(stream: Any, data: bytes) -> None:
    raise AssertionError("nothing here is HTTP/2")


def _server(keep: bool) -> tuple[Http1Server, EchoRoute]:
    route = EchoRoute()
    server = Http1Server(
        app=_no_app,
        config=LeanConfig(),
        context=None,
        state={},
        route=route,  # type: ignore[arg-type]
        access=None,
        connections=Connections(),
        output=OutputBudget(),
        hand_over=_no_hand_over,
        tls_close_timeout=1.0,
        max_body_bytes=route.max_body_bytes,
    )
    if not keep:
        server.plain_heads = PlainHeads(0)
    return server, route


_DATE = re.compile(rb"\r\ndate: [^\r]*")
_NEW_ID = re.compile(rb"\r\nx-request-id: [0-9a-f]{16}\r\n")


def _masked(data: bytes) -> bytes:
    """What a client reads, without what differs by the clock and by chance."""
    return _NEW_ID.sub(b"\r\nx-request-id: (new)\r\n", _DATE.sub(b"\r\ndate: (now)", data))


Served = tuple[bytes, list[Seen], int, list[bytes]]


def _serve(writes: list[bytes], keep: bool) -> Served:
    """Write each of `writes` in turn to a connection of a fresh server, letting the
    server do all it can after each; what the client read, the requests the route saw,
    how many were served from a kept head, and the heads kept."""
    server, route = _server(keep)
    received = bytearray()

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.readiness.run)
            nursery.start_soon(server.deadlines.run)
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            nursery.start_soon(Http1Connection(server, stream).run)
            theirs.setblocking(False)
            for data in writes:
                try:
                    theirs.sendall(data)
                except OSError:  # the server closed (after a malformed request)
                    break
                await trio.testing.wait_all_tasks_blocked(0.01)
                while True:
                    try:
                        more = theirs.recv(1 << 16)
                    except BlockingIOError:
                        break
                    if not more:
                        break
                    received.extend(more)
            await trio.testing.wait_all_tasks_blocked(0.01)
            with contextlib.suppress(OSError):
                received.extend(theirs.recv(1 << 16))
            theirs.close()
            await trio.testing.wait_all_tasks_blocked(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    kept = list(server.plain_heads.heads)
    return _masked(bytes(received)), route.seen, server.plain_heads.hits, kept


def _append(path: bytes = b"a", body: bytes = b"x" * 10, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/stream/%b HTTP/1.1\r\nhost: h\r\ncontent-type: text/plain\r\n"
        b"content-length: %d\r\n%b\r\n%b" % (path, len(body), extra, body)
    )


def _both(writes: list[bytes]) -> Served:
    """`_serve` by a server that keeps heads, checked against one that keeps none."""
    kept = _serve(writes, keep=True)
    parsed = _serve(writes, keep=False)
    assert parsed[2] == 0 and not parsed[3]
    assert kept[0] == parsed[0]
    assert kept[1] == parsed[1]
    return kept


def test_a_repeated_head_is_served_from_the_kept_one() -> None:
    """The first append of a head is parsed (and its head kept), the repeats are not:
    the same answers and the same requests as when every one is parsed."""
    data, seen, hits, kept = _both([_append(body=b"body %d" % n) for n in range(5)] + [_append()])
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 6
    assert [body for *_, body in seen] == [b"body %d" % n for n in range(5)] + [b"x" * 10]
    # The connection's first request is served by its task; the second is parsed and its
    # head kept; the third to fifth are served from it; the sixth's Content-Length makes
    # it another head, parsed and kept.
    assert hits == 3
    assert kept == [_append(body=b"body 0")[:-6], _append()[:-10]]


def test_near_misses_go_through_the_parser() -> None:
    """A head one byte different, a kept head with a body split over two reads, a
    kept head with a request pipelined behind it, a request id, Connection: close: none
    is served from the kept head, and each is answered as the parser decides."""
    warm = [_append(), _append(), _append()]
    assert _both(warm)[2] == 1
    whole = _append()
    cases = [
        [_append(path=b"b")],  # one byte of the head different
        [whole[:-3], whole[-3:]],  # the body split over two reads
        [whole + _append(path=b"c")],  # a second request behind it
        [_append(extra=b"x-request-id: mine\r\n")],
        [_append(extra=b"connection: close\r\n")],
        [_append(body=b"y" * 11)],  # another length: another head
        [whole.replace(b"content-length: 10", b"content-length: 12") + b"yy"],
    ]
    for case in cases:
        _, seen, hits, _ = _both(warm + case)
        assert hits == 1, case  # only the warm-up's third request
        assert len(seen) == len(warm) + sum(w.count(b"POST ") for w in case)


def test_a_kept_head_refused_per_request_is_served_by_the_general_path() -> None:
    """A kept head whose request the route refuses now (`send_append` returns None, as
    for a token that no longer covers it) goes through llhttp and is answered there."""
    denied = _append(b"deny")
    data, seen, hits, kept = _both([denied, denied, denied, denied, denied])
    assert kept == [denied[:-10]]  # the second kept it; the third was still sent on
    assert hits == 1
    assert len(seen) == 5 and data.count(b"HTTP/1.1 200 OK\r\n") == 5


def test_a_kept_head_followed_by_the_wrong_length_is_parsed() -> None:
    """Bytes after a kept head that are not its body's length exactly (fewer, then the
    rest with a second request in the same read) are parsed; the answers keep their
    order."""
    whole = _append()
    head_end = whole.index(b"\r\n\r\n") + 4
    writes = [whole, whole, whole[: head_end + 4], whole[head_end + 4 :] + whole]
    data, seen, hits, _ = _both(writes)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 4
    assert len(seen) == 4
    assert hits == 0  # the second is kept; none after it is one whole append alone


def test_requests_a_head_is_not_kept_for() -> None:
    """Heads that are not plain keep-alive HTTP/1.1 appends are never kept."""
    not_kept = [
        _append(extra=b"x-request-id: mine\r\n"),
        _append(extra=b"connection: close\r\n"),
        _append(path=b"slow"),  # the route does not send it on
        _append().replace(b"HTTP/1.1", b"HTTP/1.0"),
        _append(extra=b"expect: 100-continue\r\n"),
        b"POST /v1/stream/a HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        b"GET /v1/stream/a HTTP/1.1\r\nhost: h\r\n\r\n",
    ]
    for request in not_kept:
        _, _, hits, kept = _both([_append(path=b"first"), request, request, request])
        assert hits == 0 and not kept, request


def test_the_kept_heads_are_bounded() -> None:
    heads = PlainHeads()
    for n in range(3 * MAX_HEADS):
        heads.keep(b"head %d\r\n\r\n" % n, (None, None, 0))
        assert len(heads) <= MAX_HEADS
    heads.keep(b"x" * (MAX_HEAD_BYTES + 1), (None, None, 0))
    assert b"x" * (MAX_HEAD_BYTES + 1) not in heads.heads
    assert not PlainHeads(0).heads


def test_an_append_answer_is_written_as_the_general_renderer_writes_it() -> None:
    """A 204 written where it arrives (`_arrived`'s own rendering of it) is byte for
    byte what `_whole` renders for it, whether its head was kept or not."""
    data, *_ = _both([_append(b"nc"), _append(b"nc"), _append(b"nc", extra=b"x-request-id: r\r\n")])
    server, _ = _server(keep=False)
    answers = [(204, b"stream-next-offset: %d\r\n" % n, b"") for n in (1, 2, 3)]
    rids = [b"0" * 16, b"0" * 16, b"r"]
    expected = b"".join(
        _whole("POST", answer, server.extra_lines(False, rid))[0]  # type: ignore[index]
        for answer, rid in zip(answers, rids, strict=True)
    )
    assert data == _masked(expected)
    assert data.count(b"HTTP/1.1 204 No Content\r\n") == 3


_PATHS = [b"a", b"b", b"nc", b"slow"]
_REQUEST = st.builds(
    lambda path, body, extra, kind: (
        _append(path, body, extra)
        if kind == "post"
        else b"GET /v1/stream/%b HTTP/1.1\r\nhost: h\r\n%b\r\n" % (path, extra)
    ),
    st.sampled_from(_PATHS),
    st.sampled_from([b"", b"x", b"x" * 10, b"y" * 10, b"\r\n\r\n" * 3]),
    st.sampled_from(
        [b"", b"", b"", b"x-request-id: r1\r\n", b"connection: keep-alive\r\n", b"bad header\r\n"]
    ),
    st.sampled_from(["post", "post", "post", "get"]),
)


@settings(max_examples=60)
@given(
    requests=st.lists(_REQUEST, min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_any_bytes_are_answered_as_the_parser_answers_them(
    requests: list[bytes], cuts: list[int]
) -> None:
    """Any sequence of requests (appends and reads, repeated heads, request ids, a
    malformed header), cut into reads anywhere: a server that keeps heads answers
    exactly as one that parses every request."""
    stream = b"".join(requests)
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    # Most writes are whole requests (so that kept heads are met), some cut anywhere.
    writes = [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]
    if not cuts:
        writes = requests
    _both(writes)
