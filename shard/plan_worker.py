"""`python -m ds_cluster.shard.plan_worker`: plans JSON bodies for a shard, in a process of its own.

The `json` decoder holds the GIL, so validating a 64 MiB body in a thread would still
stop the shard's event loop; a separate process does not. The protocol on stdin/stdout
is as small as the job: the shard writes an 8-byte big-endian length and the body; the
worker answers with an 8-byte length and a msgpack payload, `jsonmode.plan_body`'s
result (the error text, or a list of `[start, stop, count]`). The body travels through
the pipe straight from the shard's buffer, with no serialization copy. The worker exits
when its stdin closes, which is also what happens when the shard dies.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from typing import BinaryIO

import msgpack

from ds_cluster.shard.core.jsonmode import plan_body

HEADER = struct.Struct(">Q")


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    read = inp.read
    while True:
        header = read(HEADER.size)
        if len(header) < HEADER.size:
            return
        (size,) = HEADER.unpack(header)
        body = read(size)
        if len(body) < size:
            return
        plan = plan_body(body)
        del body
        payload: bytes = msgpack.packb(plan if isinstance(plan, str) else [list(p) for p in plan])
        out.write(HEADER.pack(len(payload)) + payload)
        out.flush()


def main() -> int:
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
