"""The `ds-cluster` command: one entry point, one subcommand per process role or tool."""

from __future__ import annotations

import argparse
import importlib
import sys

from ds_cluster import envflags
from ds_cluster.common.lifeline import Lifeline, watch

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "shard": ("ds_cluster.shard.main", "run one shard process"),
    "gateway": ("ds_cluster.gateway.main", "run the HTTP gateway"),
    "up": ("ds_cluster.supervisor.cluster", "launch and supervise a local cluster"),
    "scale": ("ds_cluster.supervisor.scale_command", "move a running local cluster to N shards"),
    "status": ("ds_cluster.supervisor.status_command", "ring, shards, streams and moves"),
    "rebalance": (
        "ds_cluster.supervisor.rebalance_command",
        "move shards onto a new ring without a supervisor (Kubernetes)",
    ),
    "shard-drain": (
        "ds_cluster.tools.drain",
        "a shard pod's preStop hook: on a scale-down, wait until its streams have moved",
    ),
    "chaos": ("ds_cluster.tools.chaos", "chaos-test a local cluster (kills, stops, verification)"),
    "bench": ("ds_cluster.tools.bench", "benchmark a server, optionally side by side with another"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds-cluster", description=__doc__)
    parser.add_argument(
        "--lifeline",
        type=_lifeline,
        metavar="FD[:GRACE]",
        help="stop when this inherited pipe closes (set by `up` for the processes it starts)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    args_argv = sys.argv[1:] if argv is None else argv
    wanted = _subcommand(args_argv)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        # Import only the module being run: the others may pull in heavy dependencies.
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            envflags.apply(sp)  # every option also reads DS_<OPTION>; the command line wins
            sp.set_defaults(_module=module, _parser=sp)
    args = parser.parse_args(args_argv)
    envflags.resolve(args._parser, args)
    if args.lifeline is not None:
        try:
            watch(args.lifeline)
        except OSError as exc:
            parser.error(f"--lifeline {args.lifeline}: {exc.strerror}")
    return int(args._module.run(args) or 0)


def _subcommand(argv: list[str]) -> str | None:
    """The subcommand's name: the first word after the global options."""
    rest = argv[2:] if argv[:1] == ["--lifeline"] else argv
    if rest[:1] and rest[0].startswith("--lifeline="):
        rest = rest[1:]
    return rest[0] if rest else None


def _lifeline(text: str) -> Lifeline:
    try:
        return Lifeline.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
