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
import http.server
import importlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.kubernetes import KUBERNETES, render, tool, validate

from ds_cluster import envflags
from ds_cluster.cli import SUBCOMMANDS
from ds_cluster.common.shard_pattern import expand, shard_endpoints
from ds_cluster.tools.drain import split_pod_name

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("small", "production")
IMAGE = "ds-cluster"
# Variables that are not options but are read all the same (common/rpc_security.py).
EXTRA_VARIABLES = {"DS_CLUSTER_SECRET"}


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
    # Nothing else changes: no pod template, so applying it restarts no running pod.
    before = render(KUBERNETES / "overlays" / overlay)
    for kind, name, section, key in (
        ("StatefulSet", "ds-shard", "spec", "replicas"),
        ("ConfigMap", "ds-ring", "data", "DS_SHARD_COUNT"),
        ("Job", None, "metadata", "name"),
    ):
        was = find(before, kind, name)[section][key]
        find(documents, kind, name)[section][key] = was
    assert documents == before


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
            hook = container.get("lifecycle", {}).get("preStop", {}).get("exec")
            if hook is not None:  # a ds-cluster subcommand, run with the container's env
                assert hook["command"][0] == "ds-cluster"
                seen.add(hook["command"][1])
                hook_parser = subcommand_parser(hook["command"][1])
                envflags.apply(hook_parser, env)
                envflags.resolve(hook_parser, hook_parser.parse_args(hook["command"][2:]))
            volumes = {v["name"] for v in spec.get("volumes", [])}
            templates = {
                t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
            }
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes | templates
    assert {"shard", "gateway", "rebalance", "shard-drain"} <= seen


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
        # Only shard pods hold an API token: their preStop hook reads the replica count.
        token = workload["kind"] == "StatefulSet"
        assert spec["automountServiceAccountToken"] is token
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"requests", "limits"} <= container["resources"].keys()
    (role,) = [d for d in documents if d["kind"] == "Role"]
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["statefulsets"],
            "resourceNames": ["ds-shard"],
            "verbs": ["get"],
        }
    ]


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


class LocalPods:
    """The rendered manifests' pods, run as local processes: each container's args and
    environment (its ConfigMaps, its `env`, the pod's name for `metadata.name`), with the
    init container's copy of the cluster secret done here (0400, like its `install -m`)."""

    def __init__(self, root: Path, documents: list[dict[str, Any]]) -> None:
        self.root, self.documents = root, documents
        self.maps = configmaps(documents)
        self.mapper = Mapper(root)
        self.secret = secrets.token_hex(32)
        self.pods: list[Pod] = []

    def command(
        self, workload: dict[str, Any], ordinal: int, host_index: int, words: list[str]
    ) -> tuple[str, list[str], dict[str, str]]:
        """(pod name, argv, env) of `words` (the container's args, or a hook's command
        after `ds-cluster`) in replica `ordinal` of `workload`, mapped to this machine."""
        pod = f"{workload['metadata']['name']}-{ordinal}"
        (container,) = ds_cluster_containers(workload)
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for volume in set(mounts.values()):
            (self.root / pod / volume).mkdir(parents=True, exist_ok=True)
        env = container_env(container, self.maps, pod)
        for name, value in env.items():
            env[name] = self.mapper.path(value, pod, mounts)
        if "DS_SHARD_DNS_PATTERN" in env:
            env["DS_SHARD_DNS_PATTERN"] = self.mapper.dns_pattern(env["DS_SHARD_DNS_PATTERN"])
        secret_file = Path(env["DS_CLUSTER_SECRET_FILE"])
        if not secret_file.exists():
            secret_file.write_text(self.secret)
            secret_file.chmod(0o400)
        argv = list(words)
        for i, word in enumerate(argv):
            if i and argv[i - 1] in ("--listen", "--shard-address"):
                argv[i] = self.mapper.listen(word, host_index)
            else:
                argv[i] = self.mapper.path(word, pod, mounts)
        return pod, argv, env

    def use(self, documents: list[dict[str, Any]]) -> None:
        """What `kubectl apply` of another rendering changes for pods started from now on."""
        self.documents, self.maps = documents, configmaps(documents)

    def run_job(self) -> subprocess.CompletedProcess[str]:
        """The rendered Job's container, run to its end."""
        job = find(self.documents, "Job")
        (container,) = ds_cluster_containers(job)
        name, argv, env = self.command(job, 0, 0, container["args"])
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
        done = subprocess.run(
            [sys.executable, "-m", "ds_cluster", *argv],
            cwd=REPO_ROOT,
            env={**environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        (self.root / f"{name}.log").write_text(done.stdout + done.stderr)
        return done

    def start(self, workload: dict[str, Any], ordinal: int, host_index: int) -> Pod:
        (container,) = ds_cluster_containers(workload)
        name, argv, env = self.command(workload, ordinal, host_index, container["args"])
        pod = Pod(name, argv, env, self.root / f"{name}.log")
        self.pods.append(pod)
        return pod

    def stop(self) -> None:
        for pod in reversed(self.pods):
            pod.stop()

    def print_logs(self) -> None:
        for log in sorted(self.root.glob("*.log")):
            print(f"--- {log.name} ---\n{log.read_text()}")


@contextmanager
def small_cluster(root: Path) -> Iterator[tuple[str, LocalPods]]:
    """The small overlay's shards and gateway, running; yields the gateway's URL."""
    local = LocalPods(root, render(KUBERNETES / "overlays" / "small"))
    shards = find(local.documents, "StatefulSet", "ds-shard")
    try:
        for ordinal in range(shards["spec"]["replicas"]):
            local.start(shards, ordinal, ordinal)
        gateway = local.start(find(local.documents, "Deployment", "ds-gateway"), 0, 200)
        url = "http://" + gateway.process.args[gateway.process.args.index("--listen") + 1]
        yield url, local
    except BaseException:
        local.print_logs()
        raise
    finally:
        local.stop()


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
    with small_cluster(tmp_path) as (url, local), httpx.Client(timeout=30) as client:
        wait_ready(client, url, local.pods, time.monotonic() + 90)
        shard_pods, gateway_pod = local.pods[:-1], local.pods[-1]
        # The shards answer the probe the manifests give them (a TCP connect to their port).
        for pod in shard_pods:
            address = pod.process.args[pod.process.args.index("--listen") + 1]
            host, _, port = address.rpartition(":")
            socket.create_connection((host, int(port)), timeout=5).close()
        # The gateway answers its probes, and the scrape path, where the manifests say.
        (gateway,) = ds_cluster_containers(find(local.documents, "Deployment", "ds-gateway"))
        for probe in ("readinessProbe", "livenessProbe"):
            assert client.get(url + gateway[probe]["httpGet"]["path"]).status_code == 200
        assert client.get(url + "/metrics").status_code == 200
        bodies = write_streams(client, url, 12)
        assert_streams(client, url, bodies)
        # ... spread over both shards (each wrote to its own database).
        for pod in shard_pods:
            assert any(tmp_path.joinpath(pod.name).rglob("shard.db"))
        assert gateway_pod.process.poll() is None


def write_streams(client: httpx.Client, url: str, count: int) -> dict[str, str]:
    """Create `count` streams and append twice to each; {path: expected body}."""
    bodies = {}
    for n in range(count):
        path = f"/v1/stream/deploy-{n}"
        created = client.put(url + path, headers={"Content-Type": "text/plain"})
        assert created.status_code == 201, created.text
        for part in ("a", "b"):
            appended = client.post(
                url + path, content=f"{part}{n};", headers={"Content-Type": "text/plain"}
            )
            assert appended.status_code in (200, 204), appended.text
        bodies[path] = f"a{n};b{n};"
    return bodies


def assert_streams(client: httpx.Client, url: str, bodies: dict[str, str]) -> None:
    for path, body in bodies.items():
        read = client.get(url + path, params={"offset": "-1"})
        assert read.status_code == 200 and read.text == body, (path, read.status_code, read.text)


# --- the shards' preStop hook: drain on a scale-down, not on a restart -------------------


class FakeApi:
    """The hook's environment for the API stand-in, and the replica count it answers."""

    def __init__(self, env: dict[str, str], replicas: int) -> None:
        self.env, self.replicas = env, replicas
        self.asked: list[str] = []


@contextmanager
def kubernetes_api(root: Path, replicas: int) -> Iterator[FakeApi]:
    """A stand-in for the API server's one answer the hook needs (the StatefulSet), and the
    pod's service account folder."""
    account = root / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("the-token")
    (account / "namespace").write_text("ds-cluster")
    api = FakeApi({"DS_SERVICE_ACCOUNT_DIR": str(account)}, replicas)
    asked = api.asked

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            asked.append(self.path)
            wanted = "/apis/apps/v1/namespaces/ds-cluster/statefulsets/ds-shard"
            if self.path != wanted or self.headers["Authorization"] != "Bearer the-token":
                self.send_error(403)
                return
            body = json.dumps({"kind": "StatefulSet", "spec": {"replicas": api.replicas}})
            body = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api.env["DS_KUBERNETES_API"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
        assert asked, "the hook never asked the API"
    finally:
        server.shutdown()
        server.server_close()


def drain_hook(local: LocalPods, ordinal: int, extra: dict[str, str]) -> subprocess.Popen[str]:
    """Shard `ordinal`'s preStop hook, as the StatefulSet gives it, started."""
    shards = find(local.documents, "StatefulSet", "ds-shard")
    (container,) = ds_cluster_containers(shards)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "ds-cluster"
    _, argv, env = local.command(shards, ordinal, ordinal, command[1:])
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DS_", "KUBERNETES_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "ds_cluster", *argv],
        cwd=REPO_ROOT,
        env={**environ, **env, **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def drain_when_ready(
    url: str, local: LocalPods, ordinal: int, extra: dict[str, str]
) -> tuple[int, str]:
    """Once the cluster at `url` answers, shard `ordinal`'s preStop hook run to its end:
    its exit status and output."""
    with httpx.Client(timeout=30) as client:
        wait_ready(client, url, local.pods, time.monotonic() + 90)
    hook = drain_hook(local, ordinal, extra)
    out, _ = hook.communicate(timeout=60)
    return hook.returncode, out


def test_pod_names_split_into_statefulset_and_ordinal() -> None:
    assert split_pod_name("ds-shard-12") == ("ds-shard", 12)
    for bad in ("ds-shard", "ds-shard-", "-3", "ds-shard-x"):
        with pytest.raises(ValueError):
            split_pod_name(bad)


@pytest.mark.slow
def test_drain_hook_lets_a_restarting_shard_go_at_once(tmp_path: Path) -> None:
    with small_cluster(tmp_path) as (url, local), kubernetes_api(tmp_path, replicas=2) as api:
        returncode, out = drain_when_ready(url, local, 1, api.env)
        assert returncode == 0, out
        assert "stays (2 replicas)" in out
    # Without the API it cannot tell, and a shard its ring still has is not held either.
    with small_cluster(tmp_path / "again") as (url, local):
        returncode, out = drain_when_ready(url, local, 1, {})
        assert returncode == 0, out
        assert "cannot read StatefulSet ds-shard's replica count" in out
        assert "not draining" in out


@pytest.mark.slow
def test_drain_hook_does_not_hold_an_unknown_pod_whose_shard_is_silent(tmp_path: Path) -> None:
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o400)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DS_", "KUBERNETES_"))}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "ds_cluster", "shard-drain", "--id", "ds-shard-1"]
        + ["--shard-address", address, "--cluster-secret-file", str(secret)],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "did not answer in 15 s: not draining" in done.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_drain_hook_holds_a_leaving_shard_while_its_ring_has_it(tmp_path: Path) -> None:
    with small_cluster(tmp_path) as (url, local), kubernetes_api(tmp_path, replicas=1) as api:
        returncode, out = drain_when_ready(url, local, 1, {**api.env, "DS_TIMEOUT": "3"})
        assert returncode == 1, out  # no ring change came: it waited, then gave up
        assert "leaves (1 replicas)" in out and "not drained in 3 s" in out


# --- the image ---------------------------------------------------------------------------

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_builds_from_the_packages_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base.group(1))  # exact tag
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    final = text[text.rindex("\nFROM ") :]
    assert "COPY --from" not in final and "pip uninstall --yes pip" in final
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert re.search(r'^ENTRYPOINT \["ds-cluster"\]$', final, re.M)
    # Every folder the package is made of (ds_cluster/ and what its links point to) is
    # copied into the build stage and let through by the build context's ignore file.
    namespace = REPO_ROOT / "ds_cluster"
    linked = {p.resolve().name for p in namespace.iterdir() if p.is_symlink()}
    copied = set(re.findall(r"^COPY (\S+) \1$", text, re.M))
    assert {"ds_cluster", *linked} <= copied
    allowed = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{name}/" for name in copied} <= set(allowed)


# --- shard addresses from a pattern ----------------------------------------------------


def test_pattern_expands_to_ids_and_addresses() -> None:
    assert expand("ds-shard-{i}.ds-shard:7000", 3) == {
        "ds-shard-0": ("ds-shard-0.ds-shard", 7000),
        "ds-shard-1": ("ds-shard-1.ds-shard", 7000),
        "ds-shard-2": ("ds-shard-2.ds-shard", 7000),
    }
    assert expand("10.0.{i}.5:7000", 2, "s{i}") == {
        "s0": ("10.0.0.5", 7000),
        "s1": ("10.0.1.5", 7000),
    }


@pytest.mark.parametrize(
    ("pattern", "count", "ids", "message"),
    [
        ("ds-shard.ds-shard:7000", 2, "", "has no {i}"),
        ("ds-shard-{i}.ds-shard:7000", 0, "", "expected 1..1024"),
        ("ds-shard-{i}.ds-shard:7000", 2, "same", "has no {i}"),
        ("ds-shard-{i}.ds-shard", 2, "", "expected HOST:PORT"),
        ("ds-shard-{i}:7000", 2, "a={i}", "makes a bad id"),
    ],
)
def test_bad_patterns_are_refused(pattern: str, count: int, ids: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        expand(pattern, count, ids)


def test_pattern_and_list_exclude_each_other() -> None:
    given = argparse.Namespace(shard_dns_pattern="s-{i}.s:1", shard_count=2, shard_id_pattern="")
    with pytest.raises(ValueError, match="exclude each other"):
        shard_endpoints("a=h:1", given, flag="--shards")
    assert list(shard_endpoints("", given, flag="--shards")) == ["s-0", "s-1"]
    listed = argparse.Namespace(shard_dns_pattern="", shard_count=2, shard_id_pattern="")
    with pytest.raises(ValueError, match="need --shard-dns-pattern"):
        shard_endpoints("a=h:1", listed, flag="--shards")
    listed.shard_count = 0
    assert shard_endpoints("a=h:1", listed, flag="--shards") == {"a": ("h", 1)}


def rendered_with_shards(root: Path, count: int) -> list[dict[str, Any]]:
    """The small overlay after the one edit that scales it: its shard count."""
    tree = root / f"kubernetes-{count}"
    shutil.copytree(KUBERNETES, tree)
    kustomization = tree / "overlays" / "small" / "kustomization.yaml"
    text = kustomization.read_text()
    kustomization.write_text(re.sub(r"(- name: ds-shard\n\s+count: )\d+", rf"\g<1>{count}", text))
    return render(tree / "overlays" / "small")


def moved_streams(job: subprocess.CompletedProcess[str]) -> int:
    assert job.returncode == 0, job.stdout + job.stderr
    found = re.search(
        r"^done: every shard serves on ring v\d+; moved (\d+) streams", job.stdout, re.M
    )
    assert found, job.stdout
    return int(found.group(1))


@pytest.mark.slow
def test_scaling_through_the_manifests_moves_streams_up_and_drains_down(tmp_path: Path) -> None:
    with (
        small_cluster(tmp_path) as (url, local),
        httpx.Client(timeout=30) as client,
        kubernetes_api(tmp_path, replicas=2) as api,
    ):
        wait_ready(client, url, local.pods, time.monotonic() + 90)
        assert moved_streams(local.run_job()) == 0  # the first deployment's Job: to-2
        bodies = write_streams(client, url, 30)
        # Up, 2 -> 3: the StatefulSet starts ds-shard-2 and the Job ds-rebalance-to-3 runs.
        local.use(rendered_with_shards(tmp_path, 3))
        api.replicas = 3
        assert find(local.documents, "Job")["metadata"]["name"] == "ds-rebalance-to-3"
        newcomer = local.start(find(local.documents, "StatefulSet", "ds-shard"), 2, 2)
        # A gateway that starts before the Job ran (its shard count already says 3)
        # routes every stream to the shard that has it.
        late = local.start(find(local.documents, "Deployment", "ds-gateway"), 1, 201)
        late_url = "http://" + late.process.args[late.process.args.index("--listen") + 1]
        wait_ready(client, late_url, local.pods, time.monotonic() + 90)
        assert_streams(client, late_url, bodies)
        moved_up = moved_streams(local.run_job())
        assert 0 < moved_up < len(bodies)  # about a third of them
        assert_streams(client, url, bodies)
        # Down, 3 -> 2: ds-shard-2 is stopped; its preStop hook holds it while the Job
        # ds-rebalance-to-2 moves its streams away, then lets it go.
        api.replicas = 2
        hook = drain_hook(local, 2, api.env)
        local.use(rendered_with_shards(tmp_path, 2))
        late = local.start(find(local.documents, "Deployment", "ds-gateway"), 2, 202)
        late_url = "http://" + late.process.args[late.process.args.index("--listen") + 1]
        wait_ready(client, late_url, local.pods, time.monotonic() + 90)
        assert_streams(client, late_url, bodies)  # its count says 2: it follows the ring of 3
        assert hook.poll() is None, hook.communicate()[0]  # held: its ring still has it
        moved_down = moved_streams(local.run_job())
        out, _ = hook.communicate(timeout=120)
        assert hook.returncode == 0 and "drained" in out, out
        print(f"moved {moved_up} of {len(bodies)} streams up, {moved_down} down")
        newcomer.stop()
        assert_streams(client, url, bodies)
        for path in bodies:  # and they take writes where they are now
            appended = client.post(url + path, content="c;", headers={"Content-Type": "text/plain"})
            assert appended.status_code in (200, 204), appended.text
        assert_streams(client, url, {path: body + "c;" for path, body in bodies.items()})
