"""Reading a test cluster's JSON logs (`running_cluster(..., log_format="json")`).

Each child writes to `LOG_DIR/NAME.log`: the supervisor's `--- argv` header, the
gateway's one `listening on` line, and otherwise one JSON object per line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

Line = dict[str, Any]


def json_lines(path: Path) -> list[Line]:
    """Every JSON line of a child's log (a line that starts with `{` must parse)."""
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines


async def wait_for_line(
    path: Path, predicate: Callable[[Line], bool], *, timeout: float = 20.0
) -> Line:
    """The first JSON line of `path` that `predicate` accepts. Another process writes it,
    just after it answered: look again until it is there (or fail after `timeout`)."""
    with trio.fail_after(timeout):
        while True:
            if path.exists():
                for line in json_lines(path):
                    if predicate(line):
                        return line
            await trio.sleep(0.05)


async def access_line(log_dir: Path, request_id: str, *, gateway: str = "gateway-0") -> Line:
    """The gateway's access-log line of the request with this id."""

    def matches(line: Line) -> bool:
        return line.get("logger") == "access" and line.get("request_id") == request_id

    return await wait_for_line(log_dir / f"{gateway}.log", matches)
