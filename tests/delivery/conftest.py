"""Fixtures of the delivery tests: the helm binary and rendered charts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.delivery.tools import REPO, find_tool

CHART = REPO / "charts" / "kubeinfer"
ALL_FEATURES = Path(__file__).parent / "values" / "all-features.yaml"
KUBE_VERSION = "1.34.0"
NOT_BUILT = "{} is not built: `make k8s-binaries` (hack/k8s/build.sh, needs a Go toolchain) builds it"

Render = Callable[..., list[dict[str, Any]]]


def tool_or_skip(name: str) -> str:
    """helm, kubeconform or kubectl from the shared control-plane build (tests/conftest.py's
    `k8s_bin`: built once by hack/k8s/build.sh, skipped without Go); KUBEINFER_<NAME> overrides it."""
    override = os.environ.get(f"KUBEINFER_{name.upper()}")
    if override:
        return override
    try:
        from tests.conftest import k8s_bin
    except ImportError:  # no shared build helper: whatever is installed
        path = find_tool(name)
        if path is None:
            pytest.skip(NOT_BUILT.format(name))
        return path
    return str(k8s_bin(name))


@pytest.fixture(scope="session")
def helm() -> str:
    return tool_or_skip("helm")


def helm_template(helm: str, *args: str, namespace: str = "kubeinfer-system") -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", "kubeinfer", str(CHART), "--namespace", namespace,
                           "--kube-version", KUBE_VERSION, *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """Render the chart with extra helm arguments; fail with helm's message if it refuses."""

    def run(*args: str, namespace: str = "kubeinfer-system") -> list[dict[str, Any]]:
        result = helm_template(helm, *args, namespace=namespace)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return run


@pytest.fixture(scope="session")
def default_docs(render: Render) -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="session")
def all_features_docs(render: Render) -> list[dict[str, Any]]:
    return render("-f", str(ALL_FEATURES))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [doc for doc in by_kind(docs, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]
