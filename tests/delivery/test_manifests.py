"""manifests/: kustomize output equals the chart, examples match the CRD (kubeconform, offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.delivery.conftest import tool_or_skip
from tests.delivery.kube_schemas import (
    SCHEMA_LOCATION,
    crd_schemas,
    definitions_from_openapi_v2,
    kinds_in_openapi_v2,
    schema_file,
    write_schemas,
)
from tests.delivery.tools import REPO

CRD = yaml.safe_load((REPO / "crds" / "inferencemodels.kubeinfer.dev.yaml").read_text())
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))


def kustomize(path: str) -> list[dict]:
    kubectl = tool_or_skip("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_kustomize_files_are_generated_from_the_current_chart(helm: str) -> None:
    result = subprocess.run([sys.executable, str(REPO / "manifests" / "render.py"), "--helm", helm, "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_kustomize_base_installs_crd_and_operator() -> None:
    kinds = sorted(doc["kind"] for doc in kustomize("manifests/base"))
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Namespace",
                     "Role", "RoleBinding", "Service", "ServiceAccount"]


def test_namespaced_overlay_swaps_the_cluster_role_for_a_role() -> None:
    docs = kustomize("manifests/overlays/namespaced")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "Role"}
    assert roles == {("kubeinfer-models", "kubeinfer"), ("kubeinfer-system", "kubeinfer-leader-election")}
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    env = {v["name"]: v.get("value") for v in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEINFER_OPERATOR_NAMESPACES"] == "kubeinfer-models"
    assert env["KUBEINFER_ENGINE_IMAGE"], "the patch must merge into the env, not replace it"


def test_examples_cover_the_documented_cases() -> None:
    specs = {path.stem: yaml.safe_load(path.read_text())["spec"] for path in EXAMPLES}
    assert specs["llama-3.1-8b-instruct"]["resources"]["gpus"] == 1
    assert specs["llama-3.1-70b-instruct-tp4"]["engine"]["tensorParallelSize"] == 4
    autoscaling = specs["qwen2.5-7b-instruct-autoscaling"]["autoscaling"]
    assert (autoscaling["enabled"], autoscaling["minReplicas"], autoscaling["maxReplicas"]) == (True, 1, 4)
    smol = specs["smollm2-cpu"]
    assert smol["resources"]["gpus"] == 0
    assert "/opt/kubeinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf" in smol["model"]["source"]
    assert "/opt/kubeinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf" in (REPO / "docker" / "engine-cpu.Dockerfile").read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_parse_as_operator_specs(path: Path) -> None:
    from kubeinfer.operator.spec import InferenceModel

    body = yaml.safe_load(path.read_text())
    body["metadata"].update(namespace="default", uid="u", generation=1)
    InferenceModel.from_body(body)


def test_examples_and_chart_models_pass_kubeconform_with_the_crd_schema(tmp_path: Path, render) -> None:
    """Offline: the CRD's own schema (strict) is enough for the InferenceModels we ship."""
    binary = tool_or_skip("kubeconform")
    write_schemas(tmp_path / "schemas", {"definitions": {}}, [CRD], {("kubeinfer.dev/v1alpha1", "InferenceModel")})
    models = [doc for doc in render("-f", str(REPO / "tests/delivery/values/all-features.yaml"))
              if doc["kind"] == "InferenceModel"]
    manifest = tmp_path / "models.yaml"
    manifest.write_text(yaml.safe_dump_all([yaml.safe_load(p.read_text()) for p in EXAMPLES] + models))
    result = subprocess.run([binary, "-strict", "-summary", "-schema-location",
                             f"{tmp_path / 'schemas'}/{SCHEMA_LOCATION}", str(manifest)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Valid: {len(EXAMPLES) + len(models)}, Invalid: 0" in result.stdout


# ---- the schema converter itself ----


def test_schema_file_layout_matches_kubeconforms_template(tmp_path: Path) -> None:
    assert schema_file(tmp_path, "v1", "Service") == tmp_path / "v1" / "service_v1.json"
    assert schema_file(tmp_path, "apps/v1", "Deployment") == tmp_path / "apps" / "deployment_v1.json"
    assert schema_file(tmp_path, "rbac.authorization.k8s.io/v1", "Role") == (
        tmp_path / "rbac.authorization.k8s.io" / "role_v1.json")


def test_openapi_conversion_is_strict_and_knows_int_or_string() -> None:
    document = {"definitions": {
        "io.k8s.api.core.v1.ServicePort": {"type": "object", "properties": {
            "targetPort": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"}}},
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
        "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": "string"},
        "io.k8s.api.core.v1.Service": {"type": "object", "properties": {"spec": {"type": "object"}},
                                        "x-kubernetes-group-version-kind": [{"group": "", "version": "v1",
                                                                             "kind": "Service"}]},
    }}
    definitions = definitions_from_openapi_v2(document)
    assert definitions["io.k8s.api.core.v1.ServicePort"]["additionalProperties"] is False
    assert {"type": "integer"} in definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["oneOf"]
    assert {"type": "number"} in definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"]["oneOf"]
    assert kinds_in_openapi_v2(document) == {("v1", "Service"): "io.k8s.api.core.v1.Service"}


def test_crd_schema_requires_identity_and_rejects_unknown_fields() -> None:
    [(key, schema)] = crd_schemas(CRD).items()
    assert key == ("kubeinfer.dev/v1alpha1", "InferenceModel")
    assert schema["properties"]["kind"]["enum"] == ["InferenceModel"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["spec"]["additionalProperties"] is False
