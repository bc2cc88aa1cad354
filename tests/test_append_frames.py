"""A plain append's own frame (`append`, common/wire.py) is served exactly as the request
it stands for (real shard processes).

Two shards started alike get the same requests with the same call ids: one as general
http `req` frames, the other with every POST that has no query and its Content-Type as
its one header sent as an `append` frame. Their answers must be the same bytes, whatever
the case: a plain append, one the shard's own lane declines (another type, JSON, a
closed or absent stream, an empty body), a path to refuse, another shard's path, another
ring version; and what the streams hold afterwards must be the same. A malformed or
duplicate `append` costs its connection only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import trio
from support.auth import open_authenticated, secret_args
from support.processes import ShardProcess, free_port

from ds_cluster.common import wire
from ds_cluster.common.ring import Ring

pytestmark = pytest.mark.slow

OCTETS = "application/octet-stream"
JSON = "application/json"
OTHER = "shard-9"  # a shard of the ring that never runs: its paths are misdirected


@contextmanager
def two_shards(tmp: Path) -> Iterator[tuple[ShardProcess, ShardProcess]]:
    """Two shards started alike (each "shard-0" of a ring with OTHER), apart."""
    dead = free_port()
    shards: list[ShardProcess] = []
    try:
        for name in ("general", "plain"):
            port = free_port()
            peers = f"shard-0=127.0.0.1:{port},{OTHER}=127.0.0.1:{dead}"
            shards.append(
                ShardProcess(tmp / name, "shard-0", *secret_args(tmp), port=port, peers=peers)
            )
        yield shards[0], shards[1]
    finally:
        for shard in shards:
            shard.stop()


def _general(i: int, method: str, path: str, headers: list[list[str]], body: bytes, r: int = 1):
    items = [wire.REQ_HTTP, i, r, method, path, "", headers, b"", body]
    return wire.encode_parts(items)


def _as_append(i: int, method: str, path: str, headers: list[list[str]], body: bytes, r: int = 1):
    """The frame a gateway sends for this request: `append` where it may be one."""
    head = wire.pack_http_head(method, path, "", headers)
    if head[0] == wire.REQ_APPEND:
        return wire.encode_http_request(i, r, head, body)
    return _general(i, method, path, headers, body, r)


async def _answer(stream: trio.SocketStream, decoder: wire.FrameDecoder) -> bytes:
    """The raw bytes of the one answer the shard sends next (checked as a frame)."""
    received = b""
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            assert data, "the shard closed a healthy connection"
            received += data
            if decoder.feed(data):
                assert not decoder.partial
                return received


def _without_endpoints(answer: bytes) -> wire.Frame:
    """`answer` decoded, the endpoints of a ring it carries left out (each shard names
    its own port there: the only difference two shards started alike may show)."""
    (frame,) = wire.FrameDecoder().feed(answer)
    ring = frame.get("a", {}).get("ring")  # type: ignore[union-attr]
    if ring is not None:
        ring["endpoints"] = {}
    return frame


def _read(answer: bytes) -> tuple[int, bytes, str]:
    """A read's status, body and next offset."""
    (frame,) = wire.FrameDecoder().feed(answer)
    assert frame["k"] == "res", frame
    offset = dict(map(tuple, frame["h"]))["stream-next-offset"]
    return frame["s"], frame["b"], offset


def _owned_by(shard_id: str, stem: str) -> str:
    ring = Ring(1, ["shard-0", OTHER], {})
    return next(f"{stem}-{n}" for n in range(1000) if ring.owner(f"{stem}-{n}") == shard_id)


async def test_an_append_frame_is_answered_as_its_request(tmp_path: Path) -> None:
    binary, json_stream, closed = (_owned_by("shard-0", stem) for stem in ("bin", "json", "shut"))
    absent, elsewhere = _owned_by("shard-0", "absent"), _owned_by(OTHER, "theirs")
    octets = [["content-type", OCTETS]]
    requests: list[tuple[str, str, list[list[str]], bytes, int]] = [
        ("PUT", binary, octets, b"", 1),
        ("PUT", json_stream, [["content-type", JSON]], b"", 1),
        ("PUT", closed, octets, b"", 1),
        ("POST", closed, [["stream-closed", "true"]], b"", 1),
        ("POST", binary, octets, b"hello", 1),  # plain
        ("POST", binary, octets, b"x" * 20_000, 1),  # plain, its body apart from its head
        ("POST", binary, [["content-type", "text/plain"]], b"no", 1),  # 409: another type
        ("POST", binary, [["content-type", OCTETS + "; q=1"]], b"same type", 1),  # 204
        ("POST", binary, octets, b"", 1),  # 400: empty
        ("POST", json_stream, [["content-type", JSON]], b'{"a": 1}', 1),  # 204, JSON
        ("POST", json_stream, [["content-type", JSON]], b"{not json", 1),  # 400
        ("POST", closed, octets, b"late", 1),  # 409: closed
        ("POST", absent, octets, b"nobody", 1),  # 404
        ("POST", "a//b", octets, b"bad path", 1),  # err bad_request
        ("POST", elsewhere, octets, b"not ours", 1),  # err misdirected
        ("POST", binary, octets, b"old ring", 2),  # err version
        ("POST", binary, octets, b"again", 1),  # plain
        ("GET", binary, [], b"", 1),
        ("GET", json_stream, [], b"", 1),
    ]
    with two_shards(tmp_path) as (general_shard, plain_shard):
        general, general_decoder, _ = await open_authenticated(general_shard.address, "shard-0")
        plain, plain_decoder, _ = await open_authenticated(plain_shard.address, "shard-0")
        sent_as_append = 0
        for call_id, (method, path, headers, body, ring) in enumerate(requests, start=300):
            parts = _as_append(call_id, method, path, headers, body, ring)
            sent_as_append += b"".join(parts)[5] == wire.REQ_APPEND
            await plain.send_all(b"".join(parts))
            await general.send_all(b"".join(_general(call_id, method, path, headers, body, ring)))
            got = await _answer(plain, plain_decoder)
            expected = await _answer(general, general_decoder)
            if method == "GET":  # (its ETag names the stream's creation time: the data)
                got_read, expected_read = _read(got), _read(expected)
                assert got_read == expected_read and got_read[0] == 200, path
            elif _without_endpoints(got) != _without_endpoints(expected):
                assert got == expected, (method, path, headers, body[:20])
        assert sent_as_append == 13  # (the plain POSTs, and those declined after all)
        await trio.aclose_forcefully(general)
        await trio.aclose_forcefully(plain)


@pytest.mark.parametrize(
    "frame",
    [
        [wire.REQ_APPEND, "p", OCTETS, 1, 1],  # an item too few
        [wire.REQ_APPEND, "p", OCTETS, 1, 1, b"x", b""],  # an item too many
        [wire.REQ_APPEND, b"p", OCTETS, 1, 1, b"x"],
        [wire.REQ_APPEND, "p", [OCTETS], 1, 1, b"x"],
        [wire.REQ_APPEND, "p", OCTETS, -1, 1, b"x"],
        [wire.REQ_APPEND, "p", OCTETS, 1, "1", b"x"],
        [wire.REQ_APPEND, "p", OCTETS, 1, 1, "x"],
        [wire.RES_DONE, 1, "0"],  # an answer, from a caller
    ],
    ids=repr,
)
async def test_a_bad_append_frame_costs_its_connection_only(tmp_path: Path, frame: list) -> None:
    with two_shards(tmp_path) as (shard, _):
        stream, decoder, _ = await open_authenticated(shard.address, "shard-0")
        packed = msgpack.packb(frame, use_bin_type=True)
        await stream.send_all(len(packed).to_bytes(4, "big") + packed)
        with trio.fail_after(10):
            assert await stream.receive_some(1024) == b""  # closed, nothing answered
        await _serves(shard)


async def test_an_append_id_in_flight_costs_its_connection(tmp_path: Path) -> None:
    with two_shards(tmp_path) as (shard, _):
        stream, decoder, _ = await open_authenticated(shard.address, "shard-0")
        path = _owned_by("shard-0", "twice")
        await stream.send_all(b"".join(_general(1, "PUT", path, [["content-type", OCTETS]], b"")))
        await _answer(stream, decoder)
        head = wire.pack_http_head("POST", path, "", [["content-type", OCTETS]])
        twice = b"".join(wire.encode_http_request(7, 1, head, b"x"))
        await stream.send_all(twice + twice)
        received = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                received += data
        assert len(wire.FrameDecoder().feed(received)) <= 1  # the first one's answer at most
        await _serves(shard)


async def _serves(shard: ShardProcess) -> None:
    """The shard lives and answers a new connection's plain append."""
    assert shard.alive(), "".join(shard.lines[-30:])
    stream, decoder, _ = await open_authenticated(shard.address, "shard-0")
    path = _owned_by("shard-0", "alive")
    await stream.send_all(b"".join(_general(1, "PUT", path, [["content-type", OCTETS]], b"")))
    await _answer(stream, decoder)
    head = wire.pack_http_head("POST", path, "", [["content-type", OCTETS]])
    await stream.send_all(b"".join(wire.encode_http_request(2, 1, head, b"x")))
    (frame,) = wire.FrameDecoder().feed(await _answer(stream, decoder))
    assert frame["k"] == "res" and frame["s"] == 204, frame
    await trio.aclose_forcefully(stream)
