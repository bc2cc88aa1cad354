"""A minimal, strict Server-Sent Events parser for chaos readers.

Sans-IO: feed it text, take out (event, data) pairs. Only what PROTOCOL.md 5.8 needs:
`event:` and `data:` fields, events separated by a blank line, comments ignored.
"""

from __future__ import annotations


class SseParser:
    def __init__(self) -> None:
        self._partial = ""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, text: str) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        text = self._partial + text
        lines = text.split("\n")
        self._partial = lines.pop()  # the unterminated remainder
        for raw in lines:
            line = raw[:-1] if raw.endswith("\r") else raw
            if line == "":
                if self._event is not None or self._data:
                    events.append((self._event or "message", "\n".join(self._data)))
                self._event, self._data = None, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
        return events
