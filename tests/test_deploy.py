"""The Kubernetes manifests, proved offline.

No API server runs here, so: every overlay renders with `kubectl kustomize` and passes
`kubernetes-validate --strict` for Kubernetes 1.33; scaling is one edit (the replica count)
that the ring's shard count and the rebalance Job's name follow; every subcommand, flag,
environment variable, port and probe path the manifests use exists in the CLI; and the
processes the `small` overlay describes, started from the rendered YAML (their args and
environment; the pods' DNS names and listen addresses mapped to loopback addresses, the
manifests' ports kept), form a working cluster.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ds_cluster import envflags
from ds_cluster.cli import SUBCOMMANDS
from ds_cluster.common.shard_pattern import expand

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("small", "production")
KUBERNETES_VERSION = "1.33.0"
BIN = Path(sys.executable).parent
IMAGE = "ds-cluster"
# Variables that are not options but are read all the same (common/rpc_security.py).
EXTRA_VARIABLES = {"DS_CLUSTER_SECRET"}


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def render(overlay: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate(documents: list[dict[str, Any]], where: Path) -> subprocess.CompletedProcess[str]:
    where.write_text(yaml.safe_dump_all(documents))
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(where)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def configmaps(documents: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in documents if d["kind"] == "ConfigMap"}


def workloads(documents: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in documents:
        if doc["kind"] in ("StatefulSet", "Deployment", "Job"):
            yield doc


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def ds_cluster_containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The containers that run `ds-cluster` (the image's entrypoint, no command of their own)."""
    for container in pod_spec(workload)["containers"]:
        if container["image"].split("/")[-1].startswith(IMAGE) and "command" not in container:
            yield container


def container_env(container: dict[str, Any], maps: dict[str, dict[str, str]], pod: str) -> dict:
    """The environment a container gets: its ConfigMaps, then its own `env` (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", item
            env[item["name"]] = pod
    return env


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    assert name in SUBCOMMANDS, f"`ds-cluster {name}` is no subcommand"
    parser = argparse.ArgumentParser(prog=f"ds-cluster {name}")
    importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
    return parser


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUBERNETES / "overlays" / request.param)


def test_overlay_passes_strict_validation(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    name, documents = rendered
    done = validate(documents, tmp_path / f"{name}.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    # ... and the validator does refuse what is wrong (an unknown field in a pod spec).
    broken = yaml.safe_load(yaml.safe_dump(documents))
    pod_spec(find(broken, "StatefulSet"))["containers"][0]["probe"] = {"path": "/healthz"}
    done = validate(broken, tmp_path / f"{name}-broken.yaml")
    assert done.returncode != 0


def test_overlay_sizes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = rendered
    shards, gateways = {"small": (2, 1), "production": (4, 3)}[name]
    assert find(documents, "StatefulSet", "ds-shard")["spec"]["replicas"] == shards
    assert find(documents, "Deployment", "ds-gateway")["spec"]["replicas"] == gateways
    assert configmaps(documents)["ds-ring"]["DS_SHARD_COUNT"] == str(shards)
    assert find(documents, "Job")["metadata"]["name"] == f"ds-rebalance-to-{shards}"
    if name == "production":
        for kind in ("StatefulSet", "Deployment"):
            assert "podAntiAffinity" in pod_spec(find(documents, kind))["affinity"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_is_one_edit_of_the_replica_count(overlay: str, tmp_path: Path) -> None:
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    kustomization = tree / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    edited = re.sub(r"(- name: ds-shard\n\s+count: )\d+", r"\g<1>7", text)
    assert edited != text
    kustomization.write_text(edited)
    documents = render(tree / "overlays" / overlay)
    assert find(documents, "StatefulSet", "ds-shard")["spec"]["replicas"] == 7
    assert configmaps(documents)["ds-ring"]["DS_SHARD_COUNT"] == "7"
    assert find(documents, "Job")["metadata"]["name"] == "ds-rebalance-to-7"


def test_every_command_flag_variable_and_port_exists(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, documents = rendered
    maps = configmaps(documents)
    seen = set()
    for workload in workloads(documents):
        spec = pod_spec(workload)
        for container in ds_cluster_containers(workload):
            args = container["args"]
            seen.add(args[0])
            parser = subcommand_parser(args[0])
            variables = {name for name, _ in envflags.options(parser)} | EXTRA_VARIABLES
            env = container_env(container, maps, workload["metadata"]["name"] + "-0")
            unknown = set(env) - variables
            assert not unknown, f"{args[0]} has no option for {sorted(unknown)}"
            # The values parse as that subcommand's options (types, choices; parse errors
            # exit), and every flag in args is one of its options.
            envflags.apply(parser, env)
            parsed = parser.parse_args(args[1:])
            envflags.resolve(parser, parsed)
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            if hasattr(parsed, "listen"):
                assert int(parsed.listen.rpartition(":")[2]) in ports.values()
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                for how in container.get(probe, {}).values():
                    if isinstance(how, dict) and "port" in how:
                        assert how["port"] in ports, f"{probe} names no port of {args[0]}"
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            for value in env.values():
                if value.startswith("/"):
                    assert any(value.startswith(m + "/") for m in mounts), value
            volumes = {v["name"] for v in spec.get("volumes", [])}
            templates = {
                t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
            }
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes | templates
    assert {"shard", "gateway"} <= seen


def test_ring_pattern_matches_the_statefulset_and_its_service(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, documents = rendered
    ring = configmaps(documents)["ds-ring"]
    shards = find(documents, "StatefulSet", "ds-shard")
    service = find(documents, "Service", shards["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    endpoints = expand(
        ring["DS_SHARD_DNS_PATTERN"], int(ring["DS_SHARD_COUNT"]), ring["DS_SHARD_ID_PATTERN"]
    )
    name = shards["metadata"]["name"]
    (shard,) = ds_cluster_containers(shards)
    (rpc_port,) = [p["containerPort"] for p in shard["ports"]]
    for i, (shard_id, (host, port)) in enumerate(endpoints.items()):
        assert shard_id == f"{name}-{i}"  # the pod's name, which DS_ID takes
        assert host.split(".")[:2] == [f"{name}-{i}", service["metadata"]["name"]]
        assert port == rpc_port == service["spec"]["ports"][0]["port"]
    policy = find(documents, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": rpc_port}]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for workload in workloads(documents):  # every pod that calls shards is let in
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert allowed.items() <= labels.items(), workload["metadata"]["name"]


def test_gateway_pods_are_scraped_where_the_gateway_serves(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, documents = rendered
    gateway = find(documents, "Deployment", "ds-gateway")
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    (container,) = ds_cluster_containers(gateway)
    (port,) = [p["containerPort"] for p in container["ports"]]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_pods_run_unprivileged(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = rendered
    for workload in workloads(documents):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"requests", "limits"} <= container["resources"].keys()


# --- the small overlay's processes, started for real -------------------------------------


class Pod:
    """One container of the rendered manifests, run as a local process."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ds_cluster", *argv],
                cwd=REPO_ROOT,
                env={**environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Mapper:
    """Pod-world names to this machine's: each pod's listen host and DNS name become a
    loopback address of its own (the manifests' ports are kept), and each volume a folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.net = (random.randrange(100, 250), random.randrange(2, 250))

    def pod_host(self, index: int) -> str:
        return f"127.{self.net[0]}.{index}.{self.net[1]}"

    def dns_pattern(self, pattern: str) -> str:
        _host, _, port = pattern.rpartition(":")
        return f"127.{self.net[0]}.{{i}}.{self.net[1]}:{port}"

    def listen(self, address: str, index: int) -> str:
        return f"{self.pod_host(index)}:{address.rpartition(':')[2]}"

    def path(self, value: str, pod: str, mounts: dict[str, str]) -> str:
        for mount_path, volume in mounts.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(self.root / pod / volume) + value[len(mount_path) :]
        return value


def pod_process(
    workload: dict[str, Any],
    ordinal: int,
    host_index: int,
    maps: dict[str, dict[str, str]],
    mapper: Mapper,
    secret: str,
) -> tuple[str, list[str], dict[str, str]]:
    """(pod name, argv, env) for one replica of `workload`, mapped to this machine. The
    init container's copy of the cluster secret is done here (0400, like `install -m`)."""
    pod = f"{workload['metadata']['name']}-{ordinal}"
    (container,) = ds_cluster_containers(workload)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    for volume in set(mounts.values()):
        (mapper.root / pod / volume).mkdir(parents=True, exist_ok=True)
    env = container_env(container, maps, pod)
    for name, value in env.items():
        env[name] = mapper.path(value, pod, mounts)
    if "DS_SHARD_DNS_PATTERN" in env:
        env["DS_SHARD_DNS_PATTERN"] = mapper.dns_pattern(env["DS_SHARD_DNS_PATTERN"])
    secret_file = Path(env["DS_CLUSTER_SECRET_FILE"])
    secret_file.write_text(secret)
    secret_file.chmod(0o400)
    argv = list(container["args"])
    for i, word in enumerate(argv):
        if argv[i - 1] == "--listen":
            argv[i] = mapper.listen(word, host_index)
        else:
            argv[i] = mapper.path(word, pod, mounts)
    return pod, argv, env


@contextmanager
def small_cluster(root: Path) -> Iterator[tuple[str, dict[str, Any], list[Pod]]]:
    documents = render(KUBERNETES / "overlays" / "small")
    maps = configmaps(documents)
    mapper = Mapper(root)
    secret = secrets.token_hex(32)
    shards = find(documents, "StatefulSet", "ds-shard")
    gateway = find(documents, "Deployment", "ds-gateway")
    pods = []
    with ExitStack() as stack:
        for ordinal in range(shards["spec"]["replicas"]):
            name, argv, env = pod_process(shards, ordinal, ordinal, maps, mapper, secret)
            pods.append(Pod(name, argv, env, root / f"{name}.log"))
            stack.callback(pods[-1].stop)
        name, argv, env = pod_process(gateway, 0, 200, maps, mapper, secret)
        gateway_pod = Pod(name, argv, env, root / f"{name}.log")
        pods.append(gateway_pod)
        stack.callback(gateway_pod.stop)
        (container,) = ds_cluster_containers(gateway)
        url = "http://" + argv[argv.index("--listen") + 1]
        try:
            yield url, container, pods
        except BaseException:
            for pod in pods:
                print(f"--- {pod.name} ---\n{pod.log.read_text()}")
            raise


def wait_ready(client: httpx.Client, url: str, pods: list[Pod], deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        for pod in pods:
            assert pod.process.poll() is None, f"{pod.name} exited: {pod.log.read_text()}"
        try:
            answer = client.get(url + "/readyz")
            if answer.status_code == 200:
                return
            last = answer.text
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"not ready in time: {last}")


@pytest.mark.slow
def test_small_overlay_processes_form_a_working_cluster(tmp_path: Path) -> None:
    with small_cluster(tmp_path) as (url, gateway, pods), httpx.Client(timeout=30) as client:
        wait_ready(client, url, pods, time.monotonic() + 90)
        # The shards answer the probe the manifests give them (a TCP connect to their port).
        for pod in pods[:-1]:
            host, _, port = pod.process.args[pod.process.args.index("--listen") + 1].rpartition(":")
            socket.create_connection((host, int(port)), timeout=5).close()
        # The gateway answers its probes, and the scrape path, where the manifests say.
        for probe in ("readinessProbe", "livenessProbe"):
            assert client.get(url + gateway[probe]["httpGet"]["path"]).status_code == 200
        assert client.get(url + "/metrics").status_code == 200
        # Streams on every shard: create, append, read through the gateway.
        bodies = {}
        for n in range(12):
            path = f"/v1/stream/deploy-{n}"
            created = client.put(path.join([url, ""]), headers={"Content-Type": "text/plain"})
            assert created.status_code == 201, created.text
            for part in ("a", "b"):
                appended = client.post(
                    url + path, content=f"{part}{n};", headers={"Content-Type": "text/plain"}
                )
                assert appended.status_code in (200, 204), appended.text
            bodies[path] = f"a{n};b{n};"
        for path, body in bodies.items():
            read = client.get(url + path, params={"offset": "-1"})
            assert read.status_code == 200 and read.text == body
        # ... and the streams are spread over both shards (each wrote to its own database).
        for pod in pods[:-1]:
            assert any(tmp_path.joinpath(pod.name).rglob("shard.db"))
