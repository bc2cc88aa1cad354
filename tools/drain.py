"""`ds-cluster shard-drain`: a shard pod's preStop hook; when the pod leaves the cluster for
good, wait until its shard has handed all its streams over.

Kubernetes stops a shard pod for two reasons that look alike from inside: a restart (a
rolling update, a node drain: the pod comes back with its volume) and a scale-down (the
StatefulSet's replica count fell below the pod's ordinal: it does not come back). A restart
must not wait; a scale-down must not stop the shard before the rebalance Job has moved its
streams to the shards that stay. The hook tells them apart by asking the Kubernetes API
for its StatefulSet's replica count (the pod's service account may `get` it, nothing more):

- ordinal < replicas: a restart; exit at once.
- ordinal >= replicas: leaving. Ask the local shard for `move_status` every second (an
  explicit, bounded poll of another process) and exit once the shard's newest ring no
  longer has it and it has nothing left to send. Kubernetes kills the pod when the grace
  period ends whatever happens; the volume is kept, so nothing is lost, and scaling back
  up brings the streams back.
- the API cannot be asked: drain only if the shard's ring already leaves it out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
import trio

from ds_cluster.common import rpc_security
from ds_cluster.common.ring import Ring, parse_listen
from ds_cluster.common.rpc_client import ShardError, ShardPool, ShardUnavailable
from ds_cluster.supervisor.rebalance import RebalanceError, ShardState

log = logging.getLogger("ds_cluster.drain")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
POLL_INTERVAL = 1.0
CALL_TIMEOUT = 10.0
API_TIMEOUT = 10.0
UNSURE_TIMEOUT = 15.0  # not known to be leaving: how long to try to learn the shard's ring


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", required=True, help="the shard's id: its pod's name, NAME-ORDINAL")
    parser.add_argument(
        "--shard-address",
        default="127.0.0.1:7000",
        metavar="HOST:PORT",
        help="the shard's RPC address, from inside its pod (default: %(default)s)",
    )
    parser.add_argument(
        "--statefulset",
        default="",
        metavar="NAME",
        help="the shard's StatefulSet (default: the id without its -ORDINAL)",
    )
    parser.add_argument(
        "--kubernetes-api",
        default="",
        metavar="URL",
        help="the API server (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)",
    )
    parser.add_argument(
        "--service-account-dir",
        type=Path,
        default=SERVICE_ACCOUNT,
        metavar="DIR",
        help="the pod's token, ca.crt and namespace (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=0.0, metavar="S", help="give up after S seconds (0: never)"
    )
    parser.add_argument("--log-level", default="INFO")
    rpc_security.add_arguments(parser)


def split_pod_name(pod: str) -> tuple[str, int]:
    """("ds-shard", 3) for "ds-shard-3" (ValueError for a name without an ordinal)."""
    name, dash, ordinal = pod.rpartition("-")
    if not dash or not name or not ordinal.isdigit():
        raise ValueError(f"{pod!r} is not a StatefulSet pod's name (NAME-ORDINAL)")
    return name, int(ordinal)


def statefulset_replicas(api: str, account: Path, name: str, timeout: float = API_TIMEOUT) -> int:
    """spec.replicas of StatefulSet `name` in the pod's namespace, from the Kubernetes API.
    Raises OSError, httpx.HTTPError or ValueError when it cannot be had."""
    namespace = (account / "namespace").read_text().strip()
    token = (account / "token").read_text().strip()
    verify: ssl.SSLContext | bool = True
    if (account / "ca.crt").exists():
        verify = ssl.create_default_context(cafile=str(account / "ca.crt"))
    url = f"{api.rstrip('/')}/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}"
    answer = httpx.get(
        url, headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=timeout
    )
    answer.raise_for_status()
    statefulset = json.loads(answer.content)
    spec = statefulset.get("spec") if type(statefulset) is dict else None
    replicas = spec.get("replicas") if type(spec) is dict else None
    if type(replicas) is not int or replicas < 0:
        raise ValueError(f"StatefulSet {name} has no replica count: {replicas!r}")
    return replicas


def default_api(environ: Mapping[str, str] = os.environ) -> str:
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT")
    if not host:
        return ""
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{port or 443}"


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format=f"%(asctime)s shard-drain {args.id} %(levelname)s: %(message)s",
    )
    try:
        statefulset, ordinal = split_pod_name(args.id)
        statefulset = args.statefulset or statefulset
        address = parse_listen(args.shard_address, None)
        security = rpc_security.from_args(args, server=False)
    except (ValueError, rpc_security.SecurityError) as exc:
        print(f"ds-cluster shard-drain: {exc}", file=sys.stderr)
        return 2
    api = args.kubernetes_api or default_api()
    replicas: int | None = None
    try:
        if not api:
            raise ValueError("not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST)")
        replicas = statefulset_replicas(api, args.service_account_dir, statefulset)
    except (OSError, httpx.HTTPError, ValueError) as exc:
        log.warning("cannot read StatefulSet %s's replica count: %s", statefulset, exc)
    if replicas is not None and ordinal < replicas:
        log.info("%s stays (%d replicas): a restart, nothing to drain", args.id, replicas)
        return 0
    if replicas is not None:
        log.info("%s leaves (%d replicas): waiting for its streams to move", args.id, replicas)
    finished = trio.run(_drain_within, args.timeout, args.id, address, security, replicas)
    if not finished:
        print(
            f"ds-cluster shard-drain: {args.id} not drained in {args.timeout:g} s", file=sys.stderr
        )
        return 1
    return 0


async def _drain_within(
    timeout: float,
    shard_id: str,
    address: tuple[str, int],
    security: rpc_security.RpcSecurity,
    replicas: int | None,
) -> bool:
    """False if `timeout` (0: none) passed first."""
    with trio.move_on_after(timeout or float("inf")):
        await drain(shard_id, address, security, leaving=replicas is not None)
        return True
    return False


async def drain(
    shard_id: str,
    address: tuple[str, int],
    security: rpc_security.RpcSecurity,
    *,
    leaving: bool,
    poll_interval: float = POLL_INTERVAL,
) -> bool:
    """Wait until the shard's ring leaves it out and it has nothing left to send; True
    then. When `leaving` is not known (False) and the ring still has the shard, False at
    once: it may be a restart, which must not wait (nor wait long for an answer)."""
    endpoints = {shard_id: address}
    said = ""
    unsure_until = trio.current_time() + UNSURE_TIMEOUT
    async with ShardPool(
        endpoints,
        Ring(0, (shard_id,), endpoints),
        role="gateway",
        name=f"drain-{shard_id}",
        secret=security.secret,
        ssl_context=security.client_ssl,
        drop_departed=False,
    ) as pool:
        while True:
            with trio.move_on_at(unsure_until if not leaving else float("inf")):
                await pool.wait_connected(shard_id)
                try:
                    answer = await pool.call(shard_id, "move_status", {}, timeout=CALL_TIMEOUT)
                    state = ShardState.from_answer(answer)
                    ring = Ring.from_wire(answer.get("ring"))
                except (ShardUnavailable, ShardError, RebalanceError, ValueError) as exc:
                    log.info("move_status: %s; asking again", exc)
                    await trio.sleep(poll_interval)
                    continue
                unsure_until = float("inf")  # the shard answers: its ring decides from now on
            if unsure_until != float("inf"):
                log.warning("%s did not answer in %g s: not draining", shard_id, UNSURE_TIMEOUT)
                return False
            in_ring = shard_id in ring.shard_ids
            if not in_ring and state.done:
                log.info(
                    "drained: ring v%d leaves %s out, nothing left to send", ring.version, shard_id
                )
                return True
            if in_ring and not leaving:
                log.warning(
                    "ring v%d still has %s and a scale-down cannot be told from a restart: "
                    "not draining",
                    ring.version,
                    shard_id,
                )
                return False
            line = (
                f"ring v{ring.version} {'still has' if in_ring else 'leaves out'} {shard_id}; "
                f"{state.out_streams} streams ({state.out_bytes} bytes) left to send"
            )
            if line != said:
                log.info("%s", line)
                said = line
            await trio.sleep(poll_interval)
