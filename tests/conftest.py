"""Root fixtures: the real Kubernetes control plane (`k8s_cluster`) and the built tools (`k8s_bin`).

Tests that need the cluster are marked `@pytest.mark.cluster`. They skip only when there is no Go
toolchain (and no binaries built before); when Go exists but the build fails, they error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "hack" / "k8s"))

import controlplane  # noqa: E402  (hack/k8s/controlplane.py: the one implementation)

CONTROL_PLANE_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
)
NO_GO = (
    "needs the Go toolchain to build the Kubernetes control plane (hack/k8s/build.sh); `go` is not on PATH"
)


def _have_prebuilt(names: tuple[str, ...]) -> bool:
    return all((controlplane.bin_dir() / name).is_file() for name in names)


def _can_build() -> bool:
    return shutil.which("go") is not None


_built = False


def _ensure_built() -> Path:
    """Run build.sh once per session (fast when cached). A failing build raises: that is an error."""
    global _built
    if not _built and _can_build():
        controlplane.build_binaries()
        _built = True
    return controlplane.bin_dir()


def k8s_bin(name: str) -> Path:
    """Path of a built binary (helm, kubeconform, kwok, kubectl, ...) without starting a cluster.

    Skips the calling test when the Go toolchain is missing and the binary was never built.
    """
    path = controlplane.bin_dir() / name
    if not path.is_file():
        if not _can_build():
            pytest.skip(f"{name}: {NO_GO}")
        _ensure_built()
        if not path.is_file():
            raise FileNotFoundError(f"hack/k8s/build.sh did not produce {path}")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _can_build() or _have_prebuilt(CONTROL_PLANE_BINARIES):
        return
    skip = pytest.mark.skip(reason=NO_GO)
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)


@dataclass
class K8sCluster:
    """What tests get from `k8s_cluster`: the admin kubeconfig, the server URL and helpers."""

    plane: controlplane.ControlPlane

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    @property
    def server(self) -> str:
        return self.plane.server

    @property
    def bin_dir(self) -> Path:
        return self.plane.bin_dir

    @property
    def state_dir(self) -> Path:
        """Holds logs/<component>.log, pki/ and the per-component kubeconfigs."""
        return self.plane.state_dir

    def bin(self, name: str) -> Path:
        return self.plane.bin_dir / name

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """The pinned kubectl as cluster admin; raises with stderr on failure when check is set."""
        return self.plane.kubectl(*args, stdin=stdin, check=check)

    def api_client(self) -> Any:
        """A fresh `kubernetes.client.ApiClient` for this cluster (admin)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and the binaries on PATH, for subprocesses (operator, helm)."""
        return os.environ | {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[K8sCluster]:
    """etcd + apiserver + controller-manager + scheduler + kwok (fake GPU nodes), once per session.

    Every CRD under crds/ is installed before the controller-manager starts, so the garbage collector
    knows the kinds from its first discovery (no ~30 s wait for its periodic resync).
    """
    if not _can_build() and not _have_prebuilt(CONTROL_PLANE_BINARIES):
        pytest.skip(NO_GO)
    _ensure_built()
    state_dir = Path(tempfile.mkdtemp(prefix="kubeinfer-cp-"))
    plane = controlplane.ControlPlane(state_dir, die_with_parent=True)
    try:
        plane.start(sorted((REPO / "crds").glob("*.yaml")))
        yield K8sCluster(plane)
    finally:
        plane.stop()
        if os.environ.get("KUBEINFER_KEEP_CLUSTER_STATE"):
            print(f"control-plane state kept in {state_dir}", file=sys.stderr)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
