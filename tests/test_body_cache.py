"""Large catch-up bodies that do not cross the shard link twice: a shard names a raw slice
with a body token (shard/slice_cache.py); a caller that sends the token back gets the
answer without that body when it is that very one (common/wire.py's `t` and `hit`).

A real shard spoken to over its RPC port; the token's parts as pure code at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
from support.auth import open_authenticated, secret_args
from support.processes import ShardProcess

from ds_cluster.common import wire
from ds_cluster.shard.slice_cache import TOKEN_BYTES, body_token
from ds_cluster.shard.streams import RECENT_BYTES

OCTETS = {"content-type": "application/octet-stream"}
PIECE = 64 * 1024
PIECES = RECENT_BYTES // PIECE + 16  # over 1 MiB: the first read from the start is disk's


# ---- the shard, over its RPC port -----------------------------------------------------


@contextmanager
def shard_process(tmp: Path) -> Iterator[ShardProcess]:
    shard = ShardProcess(tmp, "shard-0", *secret_args(tmp))
    try:
        yield shard
    finally:
        shard.stop()


def http(i: int, method: str, query: str = "", body: bytes = b"", token: bytes = b"") -> Any:
    fields = {"m": method, "p": "s", "q": query, "h": [list(kv) for kv in OCTETS.items()]}
    return {"k": "req", "i": i, "r": 1, "op": "http", **fields, "t": token, "b": body}


async def test_the_shard_leaves_out_only_the_body_the_token_names(tmp_path: Path) -> None:
    with shard_process(tmp_path) as shard:
        stream, _, _ = await open_authenticated(shard.address, "shard-0")
        decoder = wire.FrameDecoder()

        async def call(frame: Any) -> Any:
            await stream.send_all(wire.encode(frame))
            with trio.fail_after(10):
                while True:
                    data = await stream.receive_some(1 << 20)
                    assert data
                    if frames := decoder.feed(data):
                        return frames[0]

        assert (await call(http(1, "PUT")))["s"] == 201
        for n in range(PIECES):
            assert (await call(http(2 + n, "POST", body=os.urandom(PIECE))))["s"] == 204
        whole = await call(http(100, "GET", "offset=-1"))
        token = whole["t"]
        assert len(token) == TOKEN_BYTES and not whole["hit"] and len(whole["b"]) == 1 << 20
        # the token named: no body, the same head
        hit = await call(http(101, "GET", "offset=-1", token=token))
        assert (hit["hit"], hit["b"], hit["t"], hit["h"]) == (True, b"", token, whole["h"])
        # a wrong token (another position, a made-up one): the whole body, as before
        for wrong in (token[:-1] + bytes([token[-1] ^ 1]), b"x" * 64, b"x"):
            miss = await call(http(102, "GET", "offset=-1", token=wrong))
            assert (miss["hit"], miss["b"], miss["t"]) == (False, whole["b"], token)
        # a HEAD, a 304 and a read from another offset never name that body
        assert not (await call(http(103, "HEAD", "offset=-1", token=token)))["hit"]
        etag = dict(whole["h"])["etag"]
        cond = http(104, "GET", "offset=-1", token=token)
        cond["h"].append(["if-none-match", etag])
        answer = await call(cond)
        assert (answer["s"], answer["hit"], answer["t"]) == (304, False, b"")
        nxt = dict(whole["h"])["stream-next-offset"]
        answer = await call(http(105, "GET", f"offset={nxt}", token=token))
        assert not answer["hit"] and answer["t"] != token
        # deleted and re-created with the same data size: another incarnation
        assert (await call(http(106, "DELETE")))["s"] == 204
        assert (await call(http(107, "PUT")))["s"] == 201
        for n in range(PIECES):
            assert (await call(http(108 + n, "POST", body=os.urandom(PIECE))))["s"] == 204
        answer = await call(http(200, "GET", "offset=-1", token=token))
        assert not answer["hit"] and answer["b"] != whole["b"] and answer["t"] != token
        await trio.aclose_forcefully(stream)


# ---- pure pieces ------------------------------------------------------------------------


def test_tokens_differ_in_every_part_they_name() -> None:
    key = (7, 3, 0, 1 << 20)
    token = body_token(1, key, 1 << 20)
    assert len(token) == TOKEN_BYTES <= wire.MAX_TOKEN_BYTES
    assert body_token(1, key, 1 << 20) == token
    others = {
        body_token(2, key, 1 << 20),  # another storage generation
        body_token(1, (8, 3, 0, 1 << 20), 1 << 20),  # another incarnation
        body_token(1, (7, 4, 0, 1 << 20), 1 << 20),  # another stream id
        body_token(1, (7, 3, 1, 1 << 20), 1 << 20),  # another position
        body_token(1, (7, 3, 0, 1 << 19), 1 << 20),  # another size asked for
        body_token(1, key, (1 << 20) - 1),  # another length (the tail cut it)
    }
    assert len(others) == 6 and token not in others
