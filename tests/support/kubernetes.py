"""Rendering and validating the Kubernetes manifests offline (`kubectl kustomize`,
`kubernetes-validate`), with the tools the `test` extra installs next to the interpreter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

KUBERNETES = Path(__file__).resolve().parent.parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The command `name` from the venv, else from PATH (the test fails when neither has it)."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def render(overlay: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize` renders from `overlay`."""
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate(documents: list[dict[str, Any]], where: Path) -> subprocess.CompletedProcess[str]:
    """`kubernetes-validate --strict` on `documents` (written to `where` first)."""
    where.write_text(yaml.safe_dump_all(documents))
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(where)],
        capture_output=True,
        text=True,
        timeout=120,
    )
