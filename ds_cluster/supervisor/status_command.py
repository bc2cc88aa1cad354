"""`ds-cluster status [--data-dir D | --url URL] [--json]`: the ring, the shards, the moves.

With `--data-dir` (the default, ./data) it asks the supervisor of that dir over its
control socket; with no supervisor running it reports what the dir records. With
`--url` it asks a gateway (`GET /cluster/status`), which asks every shard of its ring.
Prints the ring version, each shard's address, streams and bytes, and the moves in
progress; `--json` prints the answer as it came. Exit status: 0 when every shard
answered and no move is in progress, 1 when a move is in progress or a shard did not
answer, 2 when nothing could be asked (no supervisor, no gateway).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from ds_cluster.supervisor import control, record
from ds_cluster.supervisor.rebalance import size_text

TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", type=Path, default=None, help="a local cluster's data root")
    where.add_argument("--url", default=None, help="a gateway's base URL (http://host:port)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        if args.url:
            status = _from_gateway(args.url)
        else:
            status = trio.run(_from_supervisor, (args.data_dir or Path("./data")).resolve())
    except (control.ControlError, record.RecordError, httpx.HTTPError, ValueError) as exc:
        print(f"ds-cluster status: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=1) if args.json else render(status), flush=True)
    shards = status.get("shards", {})
    settled = status.get("running", True) and all(
        "error" not in s and s.get("done", False) for s in shards.values()
    )
    return 0 if settled and not status.get("scale") else 1


def _from_gateway(url: str) -> dict[str, Any]:
    response = httpx.get(url.rstrip("/") + "/cluster/status", timeout=TIMEOUT)
    if response.status_code != 200:
        raise ValueError(f"{url} answered {response.status_code}: {response.text[:200]}")
    status = response.json()
    if type(status) is not dict:
        raise ValueError(f"{url} answered something that is not a status")
    return status


async def _from_supervisor(data_dir: Path) -> dict[str, Any]:
    try:
        async for line in control.request(data_dir, {"op": "status"}, idle_timeout=TIMEOUT):
            if line.get("type") == "result":
                if not line.get("ok"):
                    raise control.ControlError(str(line.get("message")))
                status = line.get("status")
                if type(status) is dict:
                    return {"running": True, **status}
        raise control.ControlError("the supervisor sent no status")
    except control.ControlError:
        recorded = record.load(data_dir)
        if recorded is None:
            raise
        return _recorded(data_dir, recorded)


def _recorded(data_dir: Path, rec: record.ClusterRecord) -> dict[str, Any]:
    """What a stopped cluster's dir says about it."""
    return {
        "running": False,
        "data_dir": str(data_dir),
        "ring": {"version": rec.ring_version, "shards": list(rec.shards), "endpoints": {}},
        "scale": None
        if rec.scale is None
        else {"shards": len(rec.scale.shards), "ring_version": rec.scale.ring_version},
        "shards": {
            sid: {
                "address": f"port {rec.ports[sid]}" if sid in rec.ports else "",
                "error": "stopped",
            }
            for sid in rec.running_shards
        },
    }


def render(status: dict[str, Any]) -> str:
    """The status as a short report for a terminal."""
    ring = status.get("ring", {})
    lines = []
    where = status.get("url") or status.get("data_dir") or ""
    if not status.get("running", True):
        lines.append(f"not running ({where}); the data dir records:")
    elif where:
        lines.append(f"cluster at {where}")
    lines.append(f"ring v{ring.get('version')}: {', '.join(ring.get('shards', []))}")
    scale = status.get("scale")
    if scale:
        state = "running" if scale.get("running") else "unfinished"
        lines.append(
            f"scale to {scale.get('shards')} shards (ring v{scale.get('ring_version')}): {state}"
        )
    header = ("shard", "address", "ring", "streams", "bytes", "moving out", "incoming", "done")
    rows = [header]
    for sid, shard in sorted(
        status.get("shards", {}).items(), key=lambda kv: record.shard_order(kv[0])
    ):
        if "error" in shard and "streams" not in shard:
            rows.append((sid, shard.get("address", ""), "", "", "", "", "", shard["error"]))
            continue
        out = shard.get("moving_out", {})
        rows.append(
            (
                sid + ("" if shard.get("in_ring", True) else " (leaving)"),
                shard.get("address", ""),
                f"v{shard.get('ring_version')}",
                str(shard.get("streams")),
                size_text(shard.get("bytes", 0)),
                f"{out.get('streams', 0)} ({size_text(out.get('bytes', 0))})",
                str(shard.get("pending_in")),
                shard["error"] if "error" in shard else ("yes" if shard.get("done") else "no"),
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)
