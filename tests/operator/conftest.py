"""Fixtures shared by the operator tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubeinfer.operator.settings import OperatorSettings

from tests.operator.cluster import CRD_FILE, Kube, OperatorProcess, kubeconfig_of, permission_rules, wait_for


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    for var in ("KUBEINFER_ENGINE_IMAGE", "KUBEINFER_ENGINE_CPU_IMAGE", "KUBEINFER_QUEUE_METRIC_NAME"):
        monkeypatch.delenv(var, raising=False)
    return OperatorSettings(engine_image="registry.example/engine:1", engine_cpu_image="registry.example/engine-cpu:1")


# ---- the real control plane (the `k8s_cluster` fixture comes from tests/conftest.py) ----


OPERATOR_NAMESPACE = "kubeinfer-system"
OPERATOR_SA = "kubeinfer-operator"


@pytest.fixture(scope="session")
def kube(k8s_cluster) -> Kube:
    return Kube(kubeconfig_of(k8s_cluster))


@pytest.fixture(scope="session")
def crd(kube: Kube) -> dict:
    manifest = yaml.safe_load(CRD_FILE.read_text())
    kube.apply(manifest)

    def established() -> bool:
        live = kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, manifest["metadata"]["name"])
        return any(c["type"] == "Established" and c["status"] == "True" for c in live["status"].get("conditions", []))

    wait_for(established, timeout=30, what="the CRD to be established")
    kube.dynamic.resources.invalidate_cache()
    return manifest


@pytest.fixture(scope="session")
def operator_kubeconfig(kube: Kube, crd: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A service account bound to exactly the rules of operator/PERMISSIONS.md."""
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}})
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE}})
    subject = [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": OPERATOR_NAMESPACE}]
    rbac = "rbac.authorization.k8s.io/v1"
    kube.apply({"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": "kubeinfer-operator-test"},
                "rules": permission_rules("namespaced-rules") + permission_rules("cluster-rules")})
    kube.apply({"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": "kubeinfer-operator-test"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "kubeinfer-operator-test"}, "subjects": subject})
    kube.apply({"apiVersion": rbac, "kind": "Role",
                "metadata": {"name": "kubeinfer-operator-lease", "namespace": OPERATOR_NAMESPACE},
                "rules": permission_rules("lease-rules")})
    kube.apply({"apiVersion": rbac, "kind": "RoleBinding",
                "metadata": {"name": "kubeinfer-operator-lease", "namespace": OPERATOR_NAMESPACE},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                            "name": "kubeinfer-operator-lease"}, "subjects": subject})
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    return kube.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SA, path)


@pytest.fixture(scope="session")
def operator(operator_kubeconfig: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = Path(tmp_path_factory.mktemp("operator-log")) / "operator.log"
    process = OperatorProcess(operator_kubeconfig, log, lease_namespace=OPERATOR_NAMESPACE)
    process.start()
    yield process
    process.stop()
    print(f"\noperator log: {log}")


@pytest.fixture
def namespace(kube: Kube, operator: OperatorProcess) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    kube.delete("v1", "Namespace", None, name)
