"""Shard ids and addresses from a naming pattern, for shards with stable DNS names.

A Kubernetes StatefulSet names its pods `NAME-0 .. NAME-{N-1}` and its headless Service
gives each one the DNS name `NAME-i.SERVICE`. Rather than listing every shard (`--shards`
on a gateway, `--peers` on a shard), a process is told the pattern and the count, and the
count is the one setting that changes when the cluster is scaled:

    --shard-dns-pattern 'ds-shard-{i}.ds-shard:7000' --shard-count 4

gives the shards `ds-shard-0` .. `ds-shard-3` at `ds-shard-0.ds-shard:7000` .. . A shard's
id is the first label of its host (the pod's name) unless `--shard-id-pattern` says
otherwise. `{i}` is the only placeholder; nothing else in a pattern is interpreted.
"""

from __future__ import annotations

import argparse

from ds_cluster.common.ring import Endpoint, parse_endpoints, parse_listen

PLACEHOLDER = "{i}"
MAX_SHARDS = 1024


def add_pattern_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-dns-pattern",
        default="",
        metavar="HOST:PORT",
        help="address of shard {i}, e.g. 'ds-shard-{i}.ds-shard:7000' (a StatefulSet's "
        "headless Service); with --shard-count, instead of listing every shard",
    )
    parser.add_argument(
        "--shard-count", type=int, default=0, metavar="N", help="shards 0..N-1 of the pattern"
    )
    parser.add_argument(
        "--shard-id-pattern",
        default="",
        metavar="ID",
        help="id of shard {i} (default: the first label of the pattern's host)",
    )


def expand(address_pattern: str, count: int, id_pattern: str = "") -> dict[str, Endpoint]:
    """{id: (host, port)} of shards 0..count-1 (ValueError if a pattern is unusable)."""
    if PLACEHOLDER not in address_pattern:
        raise ValueError(f"--shard-dns-pattern {address_pattern!r} has no {PLACEHOLDER}")
    if not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"--shard-count {count}: expected 1..{MAX_SHARDS}")
    parse_listen(address_pattern.replace(PLACEHOLDER, "0"), None)  # HOST:PORT, or refused
    if not id_pattern:
        id_pattern = address_pattern.rpartition(":")[0].split(".")[0]
    if PLACEHOLDER not in id_pattern:
        raise ValueError(f"--shard-id-pattern {id_pattern!r} has no {PLACEHOLDER}")
    endpoints: dict[str, Endpoint] = {}
    for i in range(count):
        shard_id = id_pattern.replace(PLACEHOLDER, str(i))
        if not shard_id or "," in shard_id or "=" in shard_id:
            raise ValueError(f"--shard-id-pattern {id_pattern!r} makes a bad id {shard_id!r}")
        endpoints[shard_id] = parse_listen(address_pattern.replace(PLACEHOLDER, str(i)), None)
    return endpoints


def shard_endpoints(listed: str, args: argparse.Namespace, *, flag: str) -> dict[str, Endpoint]:
    """The shards given by `flag` (`ID=HOST:PORT,...`) or by the pattern options, not both."""
    if not args.shard_dns_pattern:
        if args.shard_count or args.shard_id_pattern:
            raise ValueError("--shard-count and --shard-id-pattern need --shard-dns-pattern")
        return parse_endpoints(listed)
    if listed:
        raise ValueError(f"{flag} and --shard-dns-pattern exclude each other")
    return expand(args.shard_dns_pattern, args.shard_count, args.shard_id_pattern)
