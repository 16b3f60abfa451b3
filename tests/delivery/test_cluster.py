"""The chart and the manifests against the real control plane (`k8s_cluster`, tests/conftest.py).

- `helm install` creates the CRD, the operator Deployment, its ServiceAccount and RBAC;
- the operator, run as that ServiceAccount (a TokenRequest token) with nothing but the chart's
  RBAC, reconciles an InferenceModel — and that identity cannot do what PERMISSIONS.md leaves out;
- every rendered manifest passes kubeconform with schemas from this API server, and the server
  itself accepts them (server-side dry run); so do `manifests/` (kustomize) and the examples.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.delivery.conftest import ALL_FEATURES, CHART, by_kind, tool_or_skip
from tests.delivery.kube_schemas import SCHEMA_LOCATION, write_schemas
from tests.delivery.tools import REPO
from tests.operator.cluster import Kube, OperatorProcess, kubeconfig_of, wait_for

pytestmark = pytest.mark.cluster

RELEASE = NAMESPACE = "kubeinfer-helm"  # fullname = release (it contains the chart name)
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"
MODELS_NAMESPACE = "kubeinfer-helm-models"
ENGINE_IMAGE = "kubeinfer/engine:chart-rbac"  # tells this test's operator apart from any other
NOT_SERVED = {"ServiceMonitor", "PodMonitor", "ScaledObject"}  # their CRDs are not in the test cluster
CRD_FILE = REPO / "crds" / "inferencemodels.kubeinfer.dev.yaml"


def run(*command: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(command[:4])}…: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def kube(k8s_cluster: Any) -> Kube:
    return Kube(kubeconfig_of(k8s_cluster))


@pytest.fixture(scope="module")
def kubectl() -> str:
    return tool_or_skip("kubectl")


@pytest.fixture(scope="module")
def release(helm: str, kube: Kube) -> Iterator[subprocess.CompletedProcess[str]]:
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MODELS_NAMESPACE}})
    # --force-conflicts: the session's fixture applied the same CRD with kubectl before, and Helm 4
    # applies crds/ server-side (the chart README tells users the same).
    installed = run(helm, "install", RELEASE, str(CHART), "--kubeconfig", kube.kubeconfig,
                    "--namespace", NAMESPACE, "--create-namespace", "--force-conflicts", timeout=300)
    yield installed
    # The CRD stays (Helm never deletes CRDs): other tests of this session use it.
    run(helm, "uninstall", RELEASE, "--kubeconfig", kube.kubeconfig, "--namespace", NAMESPACE, check=False)


def test_helm_install_creates_crd_operator_and_rbac(release: subprocess.CompletedProcess[str], kube: Kube) -> None:
    crd = kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "inferencemodels.kubeinfer.dev")
    assert crd is not None
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True"
                         for c in kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", None,
                                           "inferencemodels.kubeinfer.dev")["status"]["conditions"]),
             timeout=30, what="the CRD to be established")
    deployment = kube.get("apps/v1", "Deployment", NAMESPACE, RELEASE)
    assert deployment is not None
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubeinfer", "operator"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == RELEASE
    assert kube.get("v1", "ServiceAccount", NAMESPACE, RELEASE) is not None
    assert kube.get("v1", "Service", NAMESPACE, RELEASE) is not None
    assert kube.get("rbac.authorization.k8s.io/v1", "ClusterRole", None, RELEASE) is not None
    assert kube.get("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None, RELEASE) is not None
    assert kube.get("rbac.authorization.k8s.io/v1", "Role", NAMESPACE, f"{RELEASE}-leader-election") is not None
    notes = release.stdout
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in notes and "from openai import OpenAI" in notes


def start_operator_as(kube: Kube, namespace: str, account: str, folder: Path, engine_image: str,
                      watched: str = "") -> OperatorProcess:
    """`kubeinfer operator` authenticated as a ServiceAccount (TokenRequest), as its pod would be."""
    kubeconfig = kube.service_account_kubeconfig(namespace, account, folder / "kubeconfig")
    process = OperatorProcess(kubeconfig, folder / "operator.log", lease_namespace=namespace)
    process.env.update(KUBEINFER_ENGINE_IMAGE=engine_image, KUBEINFER_OPERATOR_NAMESPACES=watched)
    process.start()
    return process


def forbidden_requests(log: str) -> list[str]:
    """Every request the operator made that its RBAC refused (none, in either mode)."""
    return [line for line in log.splitlines() if "Forbidden" in line]


def assert_reconciles(kube: Kube, process: OperatorProcess, namespace: str, engine_image: str) -> None:
    """An InferenceModel gets its children and a status from `process` (its engine image tells it apart)."""
    name = f"rbac-{uuid.uuid4().hex[:6]}"
    kube.create({"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel",
                 "metadata": {"name": name, "namespace": namespace},
                 "spec": {"model": {"source": "hf://org/tiny"}, "resources": {"gpus": 1},
                          "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2}}})
    try:
        deployment = wait_for(lambda: kube.get("apps/v1", "Deployment", namespace, name), timeout=60,
                              what="the engine Deployment")
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == engine_image
        assert wait_for(lambda: kube.get("v1", "Service", namespace, name), timeout=30, what="the Service")
        assert wait_for(lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, name),
                        timeout=30, what="the HPA")
        status = wait_for(lambda: (kube.get("kubeinfer.dev/v1alpha1", "InferenceModel", namespace, name)
                                   or {}).get("status", {}).get("observedGeneration"), timeout=60,
                          what="status written by the operator")
        assert status == 1
        assert wait_for(lambda: kube.events(namespace, name), timeout=30, what="an event")
        assert process.alive()
        assert forbidden_requests(process.log_path.read_text(errors="replace")) == []
    finally:
        kube.delete("kubeinfer.dev/v1alpha1", "InferenceModel", namespace, name)


def test_operator_reconciles_with_exactly_the_charts_rbac(release: subprocess.CompletedProcess[str], kube: Kube,
                                                          tmp_path: Path) -> None:
    process = start_operator_as(kube, NAMESPACE, RELEASE, tmp_path, ENGINE_IMAGE)
    try:
        assert_reconciles(kube, process, MODELS_NAMESPACE, ENGINE_IMAGE)
    finally:
        process.stop()


CAN = [("get", "secrets"), ("list", "inferencemodels.kubeinfer.dev"), ("patch", "inferencemodels.kubeinfer.dev/status"),
       ("patch", "deployments.apps"), ("create", "events"), ("delete", "horizontalpodautoscalers.autoscaling")]
CANNOT = [("list", "secrets"), ("watch", "secrets"), ("update", "inferencemodels.kubeinfer.dev"),
          ("delete", "inferencemodels.kubeinfer.dev"), ("delete", "deployments.apps"), ("create", "pods"),
          ("delete", "pods"), ("get", "configmaps"), ("create", "clusterroles.rbac.authorization.k8s.io"),
          ("create", "serviceaccounts/token"), ("patch", "deployments.apps/scale"), ("patch", "nodes"), ("create", "pods/exec")]


@pytest.mark.parametrize("allowed, verb, resource", [(True, *p) for p in CAN] + [(False, *p) for p in CANNOT],
                         ids=[f"can-{v}-{r}" for v, r in CAN] + [f"cannot-{v}-{r}" for v, r in CANNOT])
def test_service_account_rights_are_those_of_permissions_md(release: subprocess.CompletedProcess[str], kube: Kube,
                                                            kubectl: str, allowed: bool, verb: str,
                                                            resource: str) -> None:
    resource, _, subresource = resource.partition("/")
    extra = [f"--subresource={subresource}"] if subresource else []
    result = run(kubectl, "--kubeconfig", kube.kubeconfig, "auth", "can-i", verb, resource, *extra,
                 "--namespace", MODELS_NAMESPACE, "--as", SERVICE_ACCOUNT, check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stdout + result.stderr


def test_namespaced_mode_works_and_grants_nothing_outside_the_watched_namespaces(
        helm: str, kube: Kube, kubectl: str, tmp_path: Path) -> None:
    release, watched = "kubeinfer-nsmode", f"nsmode-{uuid.uuid4().hex[:6]}"
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": watched}})
    run(helm, "install", release, str(CHART), "--kubeconfig", kube.kubeconfig, "--namespace", release,
        "--create-namespace", "--force-conflicts", "--set", f"operator.watchNamespaces={{{watched}}}", timeout=300)
    try:
        account = f"system:serviceaccount:{release}:{release}"

        def can(verb: str, resource: str, namespace: str) -> str:
            return run(kubectl, "--kubeconfig", kube.kubeconfig, "auth", "can-i", verb, resource, "--namespace",
                       namespace, "--as", account, check=False).stdout.strip()

        assert can("patch", "deployments.apps", watched) == "yes"
        assert can("list", "inferencemodels.kubeinfer.dev", watched) == "yes"
        assert can("patch", "deployments.apps", MODELS_NAMESPACE) == "no"
        assert can("list", "inferencemodels.kubeinfer.dev", MODELS_NAMESPACE) == "no"
        assert can("list", "customresourcedefinitions.apiextensions.k8s.io", "default") == "no"
        assert can("update", "leases.coordination.k8s.io", release) == "yes"
        process = start_operator_as(kube, release, release, tmp_path, "kubeinfer/engine:chart-nsmode", watched)
        try:
            assert_reconciles(kube, process, watched, "kubeinfer/engine:chart-nsmode")
        finally:
            process.stop()
    finally:
        run(helm, "uninstall", release, "--kubeconfig", kube.kubeconfig, "--namespace", release, check=False)


# ---- every manifest we ship, validated offline (kubeconform) and by the API server ----


def rendered_manifests(helm: str, kubectl: str) -> dict[str, list[dict[str, Any]]]:
    def helm_docs(*args: str) -> list[dict[str, Any]]:
        out = run(helm, "template", "kubeinfer", str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.34.0",
                  "--include-crds", *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def kustomize(path: str) -> list[dict[str, Any]]:
        out = run(kubectl, "kustomize", str(REPO / path)).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    examples = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "manifests" / "examples").glob("*.yaml"))]
    return {
        "chart-defaults": helm_docs(),
        "chart-all-features": helm_docs("-f", str(ALL_FEATURES)),
        "chart-namespaced": helm_docs("--set", "operator.watchNamespaces={team-a}"),
        "kustomize-base": kustomize("manifests/base"),
        "kustomize-namespaced": kustomize("manifests/overlays/namespaced"),
        "examples": examples,
    }


@pytest.fixture(scope="module")
def manifests(helm: str, kubectl: str) -> dict[str, list[dict[str, Any]]]:
    return rendered_manifests(helm, kubectl)


@pytest.fixture(scope="module")
def schema_dir(kube: Kube, manifests: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory,
               kubectl: str) -> Path:
    openapi = json.loads(run(kubectl, "--kubeconfig", kube.kubeconfig, "get", "--raw", "/openapi/v2",
                             timeout=120).stdout)
    wanted = {(doc["apiVersion"], doc["kind"]) for docs in manifests.values() for doc in docs
              if doc["kind"] not in NOT_SERVED}
    root = tmp_path_factory.mktemp("schemas")
    missing = write_schemas(root, openapi, [yaml.safe_load(CRD_FILE.read_text())], wanted)
    assert missing == []
    return root


def kubeconform(schema_dir: Path, docs: list[dict[str, Any]], folder: Path) -> subprocess.CompletedProcess[str]:
    binary = tool_or_skip("kubeconform")
    path = folder / f"{uuid.uuid4().hex}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return run(binary, "-strict", "-summary", "-output", "text", "-skip", ",".join(sorted(NOT_SERVED)),
               "-schema-location", f"{schema_dir}/{SCHEMA_LOCATION}", str(path), check=False)


@pytest.mark.parametrize("source", ["chart-defaults", "chart-all-features", "chart-namespaced", "kustomize-base",
                                    "kustomize-namespaced", "examples"])
def test_kubeconform_accepts_every_manifest(source: str, manifests: dict, schema_dir: Path, tmp_path: Path) -> None:
    result = kubeconform(schema_dir, manifests[source], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Invalid: 0, Errors: 0" in result.stdout, result.stdout


@pytest.mark.parametrize("broken", [
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
     "spec": {"replicas": "two", "selector": {}, "template": {}}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}},
    {"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel", "metadata": {"name": "x"},
     "spec": {"model": {"source": "hf://a/b"}, "engine": {"dtype": "int3"}}},
    {"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel", "metadata": {"name": "x"},
     "spec": {"model": {"source": "hf://a/b"}, "replica": 2}},
], ids=["wrong-type", "unknown-field", "crd-bad-enum", "crd-unknown-field"])
def test_kubeconform_rejects_broken_manifests(broken: dict, schema_dir: Path, tmp_path: Path) -> None:
    result = kubeconform(schema_dir, [broken], tmp_path)
    assert result.returncode != 0 and "Invalid: 1" in result.stdout, result.stdout


@pytest.mark.parametrize("source", ["chart-all-features", "chart-namespaced", "kustomize-namespaced", "examples"])
def test_api_server_accepts_every_manifest_in_a_dry_run(source: str, manifests: dict, kube: Kube, kubectl: str,
                                                        tmp_path: Path) -> None:
    docs = [doc for doc in manifests[source] if doc["kind"] not in NOT_SERVED]
    for namespace in ({doc["metadata"].get("namespace") for doc in docs} | {MODELS_NAMESPACE}) - {None}:
        if not any(d["kind"] == "Namespace" and d["metadata"]["name"] == namespace for d in docs):
            kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    # Namespaces first (a dry-run namespace does not exist for the objects in it), then the rest.
    namespaces = [doc for doc in docs if doc["kind"] == "Namespace"]
    for doc in namespaces:
        kube.apply(doc)
    rest = [doc for doc in docs if doc["kind"] != "Namespace"]
    for doc in rest:  # the examples leave the namespace to `kubectl -n`
        if doc["kind"] == "InferenceModel":
            doc["metadata"].setdefault("namespace", MODELS_NAMESPACE)
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(rest))
    result = run(kubectl, "--kubeconfig", kube.kubeconfig, "apply", "--server-side", "--force-conflicts",
                 "--dry-run=server", "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr
    assert len(by_kind(docs, "InferenceModel")) == result.stdout.count("inferencemodel.kubeinfer.dev/")


def test_api_server_rejects_an_invalid_example(kube: Kube, kubectl: str, tmp_path: Path) -> None:
    example = yaml.safe_load((REPO / "manifests" / "examples" / "llama-3.1-70b-instruct-tp4.yaml").read_text())
    example["spec"]["resources"]["gpus"] = 2  # fewer GPUs than tensorParallelSize: the CRD's CEL rule
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(example))
    result = run(kubectl, "--kubeconfig", kube.kubeconfig, "apply", "--dry-run=server", "--namespace",
                 MODELS_NAMESPACE, "-f", str(path), check=False)
    assert result.returncode != 0 and "tensorParallelSize" in result.stderr


def test_kubectl_apply_k_manifests_base(kube: Kube, kubectl: str) -> None:
    result = run(kubectl, "--kubeconfig", kube.kubeconfig, "apply", "--server-side", "--force-conflicts",
                 "-k", str(REPO / "manifests" / "base"), timeout=120)
    try:
        assert "deployment.apps/kubeinfer serverside-applied" in result.stdout
        deployment = kube.get("apps/v1", "Deployment", "kubeinfer-system", "kubeinfer")
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "kubeinfer"
        assert kube.get("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None, "kubeinfer") is not None
    finally:
        # Leave the CRD and the namespace: other tests of the session use them.
        run(kubectl, "--kubeconfig", kube.kubeconfig, "delete", "--ignore-not-found", "-f",
            str(REPO / "manifests" / "base" / "operator.yaml"), check=False)
