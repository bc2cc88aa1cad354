"""Offset tokens: the wire form of the core's integer stream positions.

An offset is `"%016d_%016d"` (33 ASCII characters): a reserved first field that is always
zero, then the position. Fixed width makes lexicographic order equal numeric order, the
tokens never contain `,&=?/`, and they can never collide with the `-1` / `now` sentinels.
The suite itself builds `0000000000000000_0000000000000000` as "the start of a stream".
"""

from __future__ import annotations

OFFSET_PREFIX = "0000000000000000_"  # every token's first field (and its "_")
_LEN = 33
MAX_POSITION = 10**16 - 1

BEGINNING = "-1"
NOW = "now"


def encode(position: int) -> str:
    """Mint the offset token of `position` (which must be in 0..MAX_POSITION)."""
    return OFFSET_PREFIX + str(position).zfill(16)  # (an f-string's format spec: 1.5x the cost)


def decode(token: str) -> int | None:
    """The position of an offset token we minted, or None if `token` is not one.

    Sentinels are not handled here (callers decide what `-1`/`now` mean)."""
    if len(token) != _LEN or not token.startswith(OFFSET_PREFIX):
        return None
    digits = token[len(OFFSET_PREFIX) :]
    if not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)
