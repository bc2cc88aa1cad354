"""`gateway.stream._rendered_answer`: a shard's answer as the native route's header lines.

Its lines must be exactly the header list `_whole_answer` builds for the same answer,
rendered (`framing.header_lines`): for an append's 204 (its own short path) and for any
other status, header set and method.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ds_cluster.gateway.framing import header_lines
from ds_cluster.gateway.stream import SentAppend, _rendered_answer, _whole_answer

_OFFSET = "0000000000000000_0000000000000123"
_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "stream-next-offset",
                "Stream-Next-Offset",
                "cache-control",
                "content-length",
                "content-type",
                "connection",  # dropped: hop by hop
                "x-content-type-options",  # dropped: the gateway's own
                "etag",
            ]
        ),
        st.sampled_from([_OFFSET, "7", "no-store", "text/plain", ""]),
    ).map(list),
    max_size=3,
)


def _res(status: int, headers: list[list[str]], body: bytes) -> dict[str, Any]:
    return {
        "k": "res",
        "i": 1,
        "s": status,
        "h": headers,
        "b": body,
        "more": False,
        "t": b"",
        "hit": False,
    }


@given(
    status=st.sampled_from([200, 201, 204, 304, 404, 500]),
    headers=_HEADERS,
    body=st.sampled_from([b"", b"x", b"body\n"]),
    method=st.sampled_from(["POST", "GET", "HEAD", "PUT"]),
)
def test_lines_are_those_of_the_whole_answer(
    status: int, headers: list[list[str]], body: bytes, method: str
) -> None:
    res = _res(status, headers, body)
    whole_status, whole_headers, whole_body = _whole_answer(res, method)
    assert _rendered_answer(res, method) == (whole_status, header_lines(whole_headers), whole_body)


def test_an_append_answer() -> None:
    """The 204 every append gets: its offset and the transport headers, nothing else."""
    status, lines, body = _rendered_answer(
        _res(204, [["stream-next-offset", _OFFSET]], b""), "POST"
    )
    assert (status, body) == (204, b"")
    assert isinstance(lines, bytes)
    assert lines.startswith(b"stream-next-offset: %b\r\n" % _OFFSET.encode())
    assert b"cache-control: no-store\r\n" in lines
    assert b"content-length" not in lines


@given(
    status=st.sampled_from([200, 204, 304, 404]),
    headers=_HEADERS,
    body=st.sampled_from([b"", b"x"]),
)
def test_an_append_sent_on_gets_its_answer_rendered_alike(
    status: int, headers: list[list[str]], body: bytes
) -> None:
    """`SentAppend.first` (its own short path for an append's 204) hands on what
    `_rendered_answer` renders; an answer that is not complete, nothing."""
    got: list[Any] = []
    sent = object.__new__(SentAppend)
    sent.arrived = got.append
    res = _res(status, headers, body)
    sent.first(res)
    sent.first({**res, "more": True})
    assert got == [_rendered_answer(res, "POST"), None]
