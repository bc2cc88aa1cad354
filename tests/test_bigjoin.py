"""Large bodies are joined, encoded and decoded without one long copy on the event loop.

Covers: a 50 MB request body used to block the gateway's and the shard's loops for
100-400 ms in single big copies (joining the received pieces, packing the RPC frame,
joining the frame's pieces and unpacking its body).
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import trio

from ds_cluster.common import bigjoin, wire

MB = 1024 * 1024


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [0],
        [5],
        [0, 0, 3, 0],
        [1, 2, 3],
        [bigjoin.THRESHOLD - 1],
        [bigjoin.THRESHOLD // 2, bigjoin.THRESHOLD // 2],
        [256 * 1024] * 9,
        [1, 3 * MB, 0, 7],
    ],
)
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_join_equals_plain_join_for_any_piece_shape(sizes: list[int], kind: type) -> None:
    pieces = [kind(os.urandom(n)) for n in sizes]
    expected = b"".join(pieces)
    joined = await bigjoin.join(pieces)
    assert type(joined) is bytes
    assert joined == expected
    assert await bigjoin.join(pieces, len(expected)) == expected


async def test_a_single_bytes_piece_is_returned_as_it_is() -> None:
    piece = os.urandom(2 * MB)
    assert await bigjoin.join([piece]) is piece


async def _largest_gap_while(work) -> tuple[float, object]:  # noqa: ANN001
    """Run `work()` while a task ticks every millisecond; the longest gap between ticks."""
    gaps: list[float] = []
    done = trio.Event()
    result: list[object] = []

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await trio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await trio.sleep(0.01)
        try:
            result.append(await work())
        finally:
            done.set()
    return max(gaps), result[0]


async def test_a_50_mb_join_leaves_the_loop_running() -> None:
    pieces = [os.urandom(256 * 1024) for _ in range(200)]
    expected = b"".join(pieces)
    started = time.perf_counter()
    for _ in range(3):
        b"".join(pieces)
    inline = (time.perf_counter() - started) / 3  # what the copy holds a loop for

    async def work() -> bytes:
        return await bigjoin.join(pieces)

    gaps = []
    for _ in range(3):  # the best of three: the machine is shared
        gap, joined = await _largest_gap_while(work)
        assert joined == expected
        gaps.append(gap)
    print(f"50 MB: {inline * 1000:.1f} ms on the loop; tick gaps {[round(g * 1000) for g in gaps]}")
    # The ticker sees a few ms (the interpreter's GIL switch interval is 5 ms); a copy
    # on the loop would show the whole join (over 20 ms even on an idle machine).
    assert min(gaps) < max(0.015, inline / 2)


def _http_request(body: bytes, call_id: int = 1) -> dict:
    return {
        "k": "req",
        "i": call_id,
        "op": "http",
        "r": 1,
        "m": "POST",
        "p": "big/one",
        "q": "a=1",
        "h": [["content-type", "application/octet-stream"]],
        "b": body,
    }


def test_a_large_body_is_encoded_as_its_own_piece_without_a_copy() -> None:
    body = os.urandom(2 * MB)
    parts = wire.encode_parts(_http_request(body))
    assert len(parts) == 2 and parts[1] is body
    frame = b"".join(parts)
    assert frame == wire.encode(_http_request(body))
    assert msgpack.unpackb(frame[4:], raw=False)[-1] == body  # the array's last item
    small = wire.encode_parts(_http_request(b"tiny"))
    assert len(small) == 1


async def _decode_all(data: bytes, step: int) -> list[wire.Frame]:
    decoder = wire.FrameDecoder()
    frames: list[wire.Frame] = []
    for at in range(0, len(data), step):
        frames += await wire.complete(decoder.feed_deferred(data[at : at + step]))
    assert decoder.partial == 0
    return frames


@pytest.mark.parametrize("step", [1000, 65536, 256 * 1024 + 3, 10 * MB])
async def test_deferred_decoding_gives_the_same_frames_in_order(step: int) -> None:
    body = os.urandom(3 * MB + 5)
    cancel = wire.encode({"k": "cancel", "i": 9})
    data = (
        cancel + wire.encode(_http_request(body, 1)) + cancel + wire.encode(_http_request(body, 2))
    )
    frames = await _decode_all(data + cancel, step)
    assert [(f["k"], f["i"]) for f in frames] == [
        ("cancel", 9),
        ("req", 1),
        ("cancel", 9),
        ("req", 2),
        ("cancel", 9),
    ]
    assert frames[1]["b"] == body and frames[3]["b"] == body  # type: ignore[typeddict-item]
    assert frames[1]["q"] == "a=1" and frames[1]["m"] == "POST"  # type: ignore[typeddict-item]
    plain = wire.FrameDecoder()
    same = [f for at in range(0, len(data), step) for f in plain.feed(data[at : at + step])]
    assert same == frames[:4]


async def test_a_large_frame_in_another_layout_is_decoded_whole() -> None:
    body = os.urandom(2 * MB)
    message = {"k": "req", "i": 1, "r": 1, "op": "move_finish", "a": {"state": body, "end": 1}}
    (frame,) = await _decode_all(wire.encode(message), 100_000)
    assert frame["a"]["state"] == body  # type: ignore[typeddict-item]


def _positional_request(body: object, **changes: object) -> list[object]:
    """`_http_request` as its array, with `body` last and the items `_<index>` changed."""
    items = wire.encode_parts(_http_request(b""))[0]
    frame: list[object] = msgpack.unpackb(items[4:], raw=False)
    frame[-1] = body
    for index, value in changes.items():
        if int(index[1:]) == len(frame):
            frame.append(value)
        else:
            frame[int(index[1:])] = value
    return frame


@pytest.mark.parametrize(
    "bad",
    [
        {"_1": "one"},  # a bad id
        {"_0": 9},  # an unknown kind
        {"_6": [["content-type", 5]]},  # a bad header pair in the head
        {"_7": "text" * MB},  # a body that is not bytes: decoded whole, then refused
        {"_8": 1},  # an item too many: the body is not last
    ],
)
async def test_a_large_frame_of_the_wrong_shape_is_refused(bad: dict) -> None:
    frame = _positional_request(os.urandom(2 * MB), **bad)
    packed = msgpack.packb(frame, use_bin_type=True)
    with pytest.raises(wire.WireError):
        await _decode_all(len(packed).to_bytes(4, "big") + packed, 256 * 1024)


async def test_a_large_frame_too_short_or_a_map_is_refused() -> None:
    for frame in (
        _positional_request(os.urandom(2 * MB))[2:],  # the body behind too few items
        [wire.CANCEL, os.urandom(2 * MB)],  # the right length, a body where none goes
        {"v": wire.WIRE_VERSION, **_http_request(os.urandom(2 * MB))},  # as an older peer
    ):
        packed = msgpack.packb(frame, use_bin_type=True)
        with pytest.raises(wire.WireError):
            await _decode_all(len(packed).to_bytes(4, "big") + packed, 256 * 1024)


async def test_a_large_frame_with_a_non_string_key_is_refused() -> None:
    body = os.urandom(2 * MB)
    # an http request whose headers hold a map with an integer key, then the body
    frame = _positional_request(body, _6={7: 1})
    packed = msgpack.packb(frame, use_bin_type=True, strict_types=False)
    with pytest.raises(wire.WireError):
        await _decode_all(len(packed).to_bytes(4, "big") + packed, 256 * 1024)
