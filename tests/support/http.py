"""Raw HTTP/1.1 messages, for tests that speak to a server (or play one) byte by byte."""

from __future__ import annotations


def parse_head(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """Split a message at its blank line: the start line, the headers (names lower-cased;
    the last of a repeated name wins), and the bytes that follow the head."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, rest
