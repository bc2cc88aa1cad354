"""Request heads of plain appends parsed before, kept so that a repeat is not parsed again.

A client appending to a stream sends the same head again and again, byte for byte (the
same request line, Content-Type and Content-Length). Parsing a head at a message boundary
is a function of its bytes alone, so once llhttp has parsed one as a plain keep-alive
HTTP/1.1 append (`gateway.http1`), what it would decide for the same bytes again is
known: a read that holds exactly that head and its Content-Length of body, and nothing
else, can be served from what was kept, without the parser's callbacks and the request
object they build. Everything else (a different head, another body length, a partial or
a pipelined read) goes through llhttp as before.

What a head may be kept for is decided where it was parsed (`Http1Connection._learn`);
here is only the bounded store: at most `limit` heads (MAX_HEADS) of at most
MAX_HEAD_BYTES bytes, emptied when full (a gateway meets the same streams again and
again).
"""

from __future__ import annotations

from typing import Any

MAX_HEADS = 1024  # heads kept
MAX_HEAD_BYTES = 2048  # bytes of a head kept (a longer one is parsed every time)
HEAD_END = b"\r\n\r\n"

# What a kept head means: (the request llhttp parsed from it, whose head-determined
# fields are read and never written; the route's `plain_append` of it; its body length).
PlainHead = tuple[Any, Any, int]


class PlainHeads:
    """The heads kept, by their exact bytes (the blank line that ends them included)."""

    __slots__ = ("heads", "hits", "limit")

    def __init__(self, limit: int = MAX_HEADS) -> None:
        """`limit`: heads kept at most (0: none, every head is parsed)."""
        self.heads: dict[bytes, PlainHead] = {}
        self.limit = limit
        self.hits = 0  # requests served from a kept head (what tests look at)

    def __len__(self) -> int:
        return len(self.heads)

    def keep(self, head: bytes, plain: PlainHead) -> None:
        """Keep `head` (a whole head, its blank line included) as meaning `plain`."""
        if len(head) > MAX_HEAD_BYTES or not self.limit:
            return
        heads = self.heads
        if len(heads) >= self.limit:
            heads.clear()
        heads[head] = plain
