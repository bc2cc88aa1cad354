"""The `production-auth-tls` overlay, proved offline like the others (tests/test_deploy.py):
it renders, passes strict validation, and its gateways get client auth and HTTPS from the
two Secrets, with every variable an option of the gateway, every file under a mount, and
the probes and the scrape speaking HTTPS."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from support.kubernetes import KUBERNETES, render, validate

from ds_cluster import envflags
from ds_cluster.gateway import main as gateway_main

OVERLAY = KUBERNETES / "overlays" / "production-auth-tls"


def gateway(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in documents if d["kind"] == "Deployment"]
    assert found["metadata"]["name"] == "ds-gateway"
    return found


def test_renders_and_passes_strict_validation(tmp_path: Path) -> None:
    done = validate(render(OVERLAY), tmp_path / "rendered.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_gateways_get_auth_and_tls_from_the_secrets() -> None:
    documents = render(OVERLAY)
    template = gateway(documents)["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    parser = argparse.ArgumentParser()
    gateway_main.add_arguments(parser)
    options = {name for name, _ in envflags.options(parser)}
    wanted = {"DS_AUTH_TOKENS", "DS_TLS_CERT", "DS_TLS_KEY"}
    assert wanted <= set(env) and wanted <= options
    envflags.apply(parser, env)
    parsed = parser.parse_args(["--listen", "0.0.0.0:4437"])
    envflags.resolve(parser, parsed)
    assert parsed.auth_tokens is not None and parsed.tls_cert is not None
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {
        v["name"]: v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v
    }
    for name in wanted:  # each file lies in a mounted Secret
        (volume,) = [v for v, path in mounts.items() if env[name].startswith(path + "/")]
        assert volume in secrets
    assert {"ds-cluster-client-auth", "ds-gateway-tls"} <= set(secrets.values())
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    assert template["metadata"]["annotations"]["prometheus.io/scheme"] == "https"


def test_everything_else_is_the_production_overlay() -> None:
    secure = render(OVERLAY)
    plain = render(KUBERNETES / "overlays" / "production")
    assert [d for d in secure if d["kind"] != "Deployment"] == [
        d for d in plain if d["kind"] != "Deployment"
    ]
    assert gateway(secure)["spec"]["replicas"] == gateway(plain)["spec"]["replicas"]
