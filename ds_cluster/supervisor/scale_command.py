"""`ds-cluster scale --data-dir D --shards N`: move a running local cluster to N shards.

Asks the supervisor of D over its control socket (control.py), prints its progress
lines (streams and bytes moved and left) and exits 0 once the cluster serves entirely on
the new ring; 1 with the reason when the scale failed (the cluster keeps serving, and
the same command resumes it); 2 when there is no supervisor to ask. Leaving early
(Ctrl-C) does not stop the scale: the supervisor owns it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from ds_cluster.supervisor import control
from ds_cluster.supervisor.record import MAX_SHARDS

# The supervisor says something at least every few seconds while a scale runs; a longer
# silence means it is gone or hung.
IDLE_TIMEOUT = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=Path("./data"), help="the cluster's data root (./data)"
    )
    parser.add_argument("--shards", type=int, required=True, help="the shard count to go to")
    parser.add_argument("--json", action="store_true", help="print the answer lines as JSON")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.shards <= MAX_SHARDS:
        print(f"ds-cluster scale: --shards must be 1 to {MAX_SHARDS}", file=sys.stderr)
        return 2
    try:
        return trio.run(_scale, args.data_dir.resolve(), args.shards, args.json)
    except control.ControlError as exc:
        print(f"ds-cluster scale: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ds-cluster scale: left; the scale goes on in the supervisor", file=sys.stderr)
        return 130


async def _scale(data_dir: Path, shards: int, as_json: bool) -> int:
    request = {"op": "scale", "shards": shards}
    async for line in control.request(data_dir, request, idle_timeout=IDLE_TIMEOUT):
        if as_json:
            print(json.dumps(line), flush=True)
        elif line.get("type") == "progress":
            print(line.get("text", ""), flush=True)
        if line.get("type") == "result":
            if line.get("ok"):
                if not as_json:
                    print(line.get("message", "done"), flush=True)
                return 0
            print(f"ds-cluster scale: {line.get('message', 'failed')}", file=sys.stderr)
            return 1
    return 1
