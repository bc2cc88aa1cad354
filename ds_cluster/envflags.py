"""Every option of a subcommand also reads `DS_<OPTION>` from the environment.

Kubernetes and container users configure processes through the environment, so each
`--some-flag` of a `ds-cluster` subcommand takes its default from `DS_SOME_FLAG` when that
variable is set and not empty. The command line wins over the environment. A value is
converted exactly as the same text on the command line would be (the option's `type` and
`choices`); on/off options accept 1/0, true/false, yes/no, on/off. A value that does not
convert is a usage error naming the variable, raised only when the option was not given on
the command line (a flag given explicitly makes its variable irrelevant).

The conversion is lazy: before parsing, each covered option's default becomes a marker
holding the variable's text; after parsing, a marker still in place (the option was not on
the command line) is converted. Options that accumulate (`append`, `count`) read their
default at parse time, so their variable is converted before parsing.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "DS_"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
EPILOG = (
    "Every option can also be set by an environment variable: DS_ and the option's name in "
    "upper case with - as _ (--max-body-bytes <- DS_MAX_BODY_BYTES). On/off options accept "
    "1/0, true/false, yes/no, on/off. The command line wins over the environment."
)


def env_name(action: argparse.Action) -> str | None:
    """`DS_MAX_BODY_BYTES` for `--max-body-bytes`; None for positionals and help/version."""
    if isinstance(action, argparse._HelpAction | argparse._VersionAction):
        return None
    longs = [s for s in action.option_strings if s.startswith("--")]
    if not longs:
        return None
    return PREFIX + longs[0][2:].upper().replace("-", "_")


def options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """(variable name, action) for every option of `parser` that reads the environment."""
    for action in parser._actions:
        name = env_name(action)
        if name is not None:
            yield name, action


@dataclass(frozen=True)
class _FromEnv:
    """A default still to be converted: the variable's name and text."""

    name: str
    text: str
    fallback: Any  # the option's own default, for an on/off variable that says "off"

    def __str__(self) -> str:  # as `%(default)s` shows it in --help
        return f"${self.name}={self.text}"


def apply(parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ) -> None:
    """Make `parser`'s options default to their environment variables (call before parsing)."""
    covered: set[argparse.Action] = set()
    for name, action in options(parser):
        text = environ.get(name, "")
        if not text.strip():
            continue
        covered.add(action)
        action.required = False
        if isinstance(action, argparse._AppendAction | argparse._CountAction):
            action.default = _convert(parser, action, _FromEnv(name, text, action.default))
        else:
            action.default = _FromEnv(name, text, action.default)
    for group in parser._mutually_exclusive_groups:
        if group.required and covered.intersection(group._group_actions):
            group.required = False
    if parser.epilog is None:
        parser.epilog = EPILOG


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Convert the environment defaults of the options the command line did not give."""
    for _, action in options(parser):
        value = getattr(args, action.dest, None)
        if isinstance(value, _FromEnv):
            setattr(args, action.dest, _convert(parser, action, value))


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, given: _FromEnv) -> Any:
    try:
        return _value(action, given)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"environment variable {given.name}={given.text!r}: {exc}")


def _value(action: argparse.Action, given: _FromEnv) -> Any:
    if isinstance(action, argparse.BooleanOptionalAction):
        return _switch(given.text)
    if isinstance(action, argparse._StoreConstAction):  # store_true, store_false, store_const
        return action.const if _switch(given.text) else given.fallback
    if isinstance(action, argparse._CountAction):
        count = int(given.text)
        if count < 0:
            raise ValueError("expected a count >= 0")
        return count
    if action.nargs in (None, "?") and not isinstance(action, argparse._AppendAction):
        return _one(action, given.text)
    words = shlex.split(given.text)
    values = [_one(action, word) for word in words]
    if isinstance(action, argparse._AppendAction):
        return [*(given.fallback or []), *values]
    return values


def _one(action: argparse.Action, text: str) -> Any:
    convert = action.type if callable(action.type) else str
    value = convert(text)
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ValueError(f"invalid choice {value!r} (choose from {choices})")
    return value


def _switch(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")
