"""Scenario names and presets: which scenarios exist, and the fixed shapes of the named fan-out
runs, so that a published figure names its load exactly and one command reproduces them all.

`longpoll` and `sse` take their shape from the --fanout-* flags; `longpoll-1000`,
`longpoll-500`, `sse-1000` and `sse-500` are fixed (readers / streams / writer msg/s).
`--preset goals` is every scenario of the goals table in docs/performance.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# the scenarios run when none is named (the order they run in)
DEFAULT = ["append", "json", "json-batch", "catchup", "longpoll", "sse", "idle"]


@dataclass(frozen=True)
class FanoutShape:
    """One writer at `rate` msg/s round-robin over `streams`, `readers` live readers."""

    mode: str  # "long-poll" or "sse"
    readers: int
    streams: int
    rate: float


FANOUT_PRESETS = {
    "longpoll-1000": FanoutShape("long-poll", 1000, 10, 50.0),
    "longpoll-500": FanoutShape("long-poll", 500, 50, 100.0),
    "sse-1000": FanoutShape("sse", 1000, 10, 50.0),
    "sse-500": FanoutShape("sse", 500, 50, 100.0),
}

SCENARIOS = [*DEFAULT, *FANOUT_PRESETS]

PRESETS = {
    "goals": [
        "append",
        "catchup",
        "longpoll-1000",
        "longpoll-500",
        "sse-500",
        "sse-1000",
        "idle",
    ],
}


def is_fanout(scenario: str) -> bool:
    return scenario in ("longpoll", "sse") or scenario in FANOUT_PRESETS


def fanout_shape(scenario: str, args: argparse.Namespace) -> FanoutShape:
    """The fixed shape of a named fan-out run, or the flags' shape for longpoll / sse."""
    if scenario in FANOUT_PRESETS:
        return FANOUT_PRESETS[scenario]
    mode = "sse" if scenario == "sse" else "long-poll"
    return FanoutShape(mode, args.fanout_readers, args.fanout_streams, args.fanout_rate)


def selected(scenario_args: list[str], preset_args: list[str]) -> list[str]:
    """The scenarios to run, in order and without repeats: the presets' and the named ones
    (comma-separated or repeated), or DEFAULT when neither names any."""
    wanted: list[str] = []
    for p in preset_args:
        if p not in PRESETS:
            raise SystemExit(f"unknown preset {p!r}; choose from {sorted(PRESETS)}")
        wanted += PRESETS[p]
    wanted += [s for item in scenario_args for s in item.split(",") if s]
    for s in wanted:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; choose from {SCENARIOS}")
    return list(dict.fromkeys(wanted)) or list(DEFAULT)
