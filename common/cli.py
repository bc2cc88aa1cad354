"""The `ds-cluster` command: one entry point, one subcommand per process role or tool."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "shard": ("shard.main", "run one shard process"),
    "gateway": ("gateway.main", "run the HTTP gateway"),
    "up": ("common.supervisor", "launch and supervise a local cluster"),
    "chaos": ("common.chaos", "chaos-test a local cluster (kills, stops, verification)"),
    "bench": ("common.bench", "benchmark a server, optionally side by side with another"),
}


def default_shard_count() -> int:
    return max(2, os.cpu_count() or 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    args_argv = sys.argv[1:] if argv is None else argv
    wanted = args_argv[0] if args_argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        # Import only the module being run: the others may pull in heavy dependencies.
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_module=module)
    args = parser.parse_args(args_argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
