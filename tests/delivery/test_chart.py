"""The Helm chart rendered with real `helm`: lint, objects, values pass-through, RBAC = PERMISSIONS.md."""

from __future__ import annotations

import re
import subprocess
import textwrap

import pytest
import yaml
from kubeinfer.operator.render.hpa import render_behavior
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import InferenceModel

from tests.delivery.conftest import ALL_FEATURES, CHART, Render, by_kind, one
from tests.delivery.tools import REPO

CRD_NAME = "inferencemodels.kubeinfer.dev.yaml"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def permission_rules(section: str) -> list[dict]:
    """A `# <section>` YAML block of operator/PERMISSIONS.md (the operator's source of truth)."""
    text = (REPO / "operator" / "PERMISSIONS.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        if block.startswith(f"# {section}\n"):
            return yaml.safe_load(block)
    raise KeyError(section)


def operator_container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str]:
    return {var["name"]: var.get("value") for var in container["env"]}


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_FEATURES)]], ids=["defaults", "all-features"])
def test_helm_lint_strict(helm: str, values: list[str]) -> None:
    result = subprocess.run([helm, "lint", "--strict", str(CHART), *values], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("copy", [CHART / "crds" / CRD_NAME, REPO / "manifests" / "base" / CRD_NAME],
                         ids=["chart", "kustomize-base"])
def test_crd_copies_are_identical_to_the_source(copy) -> None:
    assert copy.read_bytes() == (REPO / "crds" / CRD_NAME).read_bytes(), f"cp crds/{CRD_NAME} {copy.parent}/"


def test_defaults_render_only_the_operator(default_docs: list[dict]) -> None:
    kinds = sorted(doc["kind"] for doc in default_docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service",
                     "ServiceAccount"]


def test_operator_deployment_runs_the_operator_with_its_settings(default_docs: list[dict]) -> None:
    deployment = one(default_docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(default_docs)
    assert container["command"] == ["kubeinfer", "operator"]
    assert container["image"] == f"ghcr.io/kubeinfer/operator:{APP_VERSION}"
    env = env_of(container)
    assert env["KUBEINFER_OPERATOR_NAMESPACES"] == ""
    assert env["KUBEINFER_ENGINE_IMAGE"] == f"ghcr.io/kubeinfer/engine:{APP_VERSION}"
    assert env["KUBEINFER_ENGINE_CPU_IMAGE"] == f"ghcr.io/kubeinfer/engine:{APP_VERSION}-cpu"
    assert env["KUBEINFER_QUEUE_METRIC_NAME"] == OperatorSettings.model_fields["queue_metric_name"].default
    assert env["KUBEINFER_LOG_FORMAT"] == "json"
    # Every KUBEINFER_* variable the chart sets is a real operator setting.
    settings = {f"KUBEINFER_{name.upper()}" for name in OperatorSettings.model_fields}
    assert {name for name in env if name.startswith("KUBEINFER_")} <= settings
    # The liveness probe hits kopf's endpoint on the port the operator is told to use.
    probe = container["livenessProbe"]["httpGet"]
    port = next(p for p in container["ports"] if p["name"] == probe["port"])["containerPort"]
    assert probe["path"] == "/healthz" and str(port) == env["KUBEINFER_LIVENESS_PORT"]
    # Non-root with the image's uid, nothing writable but /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == one(default_docs, "ServiceAccount")["metadata"]["name"]
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}


def test_values_reach_the_operator_pod(all_features_docs: list[dict], render: Render) -> None:
    pod = one(all_features_docs, "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "llm"
    assert pod["metadata"]["annotations"] == {"example.com/team": "llm"}
    spec = pod["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in spec["affinity"] and spec["priorityClassName"] == "system-cluster-critical"
    assert env_of(spec["containers"][0])["KUBEINFER_LOG_LEVEL"] == "DEBUG"
    docs = render("--set", "operator.image.tag=9.9.9", "--set", "engine.image.repository=reg.local/engine",
                  "--set", "engine.image.tag=1.2.3", "--set", "operator.image.pullPolicy=Always",
                  "--set", "operator.logFormat=text", "--set", "operator.queueMetricName=queue_depth")
    container = operator_container(docs)
    assert container["image"] == "ghcr.io/kubeinfer/operator:9.9.9" and container["imagePullPolicy"] == "Always"
    env = env_of(container)
    assert env["KUBEINFER_ENGINE_IMAGE"] == "reg.local/engine:1.2.3"
    assert env["KUBEINFER_LOG_FORMAT"] == "text" and env["KUBEINFER_QUEUE_METRIC_NAME"] == "queue_depth"


def test_cluster_wide_rbac_is_exactly_permissions_md(default_docs: list[dict]) -> None:
    cluster_role = one(default_docs, "ClusterRole")
    assert cluster_role["rules"] == permission_rules("namespaced-rules") + permission_rules("cluster-rules")
    lease_role = one(default_docs, "Role")
    assert lease_role["rules"] == permission_rules("lease-rules")
    assert lease_role["metadata"]["namespace"] == "kubeinfer-system"
    sa = one(default_docs, "ServiceAccount")["metadata"]
    for binding in by_kind(default_docs, "ClusterRoleBinding") + by_kind(default_docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]


def test_namespaced_mode_has_a_role_per_namespace_and_no_cluster_rights(render: Render) -> None:
    docs = render("--set", "operator.watchNamespaces={team-a,team-b}")
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    roles = {doc["metadata"]["namespace"]: doc["rules"] for doc in by_kind(docs, "Role")}
    assert roles == {"team-a": permission_rules("namespaced-rules"), "team-b": permission_rules("namespaced-rules"),
                     "kubeinfer-system": permission_rules("lease-rules")}
    bindings = {doc["metadata"]["namespace"]: doc["roleRef"]["name"] for doc in by_kind(docs, "RoleBinding")}
    assert set(bindings) == {"team-a", "team-b", "kubeinfer-system"}
    assert env_of(operator_container(docs))["KUBEINFER_OPERATOR_NAMESPACES"] == "team-a,team-b"


def test_existing_service_account_and_no_rbac(render: Render, helm: str) -> None:
    docs = render("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops",
                  "--set", "rbac.create=false")
    assert sorted(doc["kind"] for doc in docs) == ["Deployment", "Service"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    from tests.delivery.conftest import helm_template

    result = helm_template(helm, "--set", "serviceAccount.create=false")
    assert result.returncode != 0 and "serviceAccount.name is required" in result.stderr


def test_all_optional_features_render(all_features_docs: list[dict]) -> None:
    kinds = {doc["kind"] for doc in all_features_docs}
    assert {"ServiceMonitor", "PodMonitor", "ScaledObject", "ConfigMap", "InferenceModel"} <= kinds
    monitor = one(all_features_docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # The engine pods the operator creates carry the labels the monitors select on.
    from kubeinfer.operator.render.common import labels
    from kubeinfer.operator.spec import InferenceModel

    im = InferenceModel.from_body({"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel",
                                   "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 1},
                                   "spec": {"model": {"source": "hf://org/m"}}})
    pod_labels = labels(im)
    for kind in ("PodMonitor", "ServiceMonitor"):
        doc = one(all_features_docs, kind)
        assert doc["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), kind
    assert monitor["spec"]["podTargetLabels"] == ["kubeinfer.dev/model"]


def test_models_become_inference_models_and_keda_takes_over_autoscaled_ones(all_features_docs: list[dict]) -> None:
    models = {doc["metadata"]["name"]: doc for doc in by_kind(all_features_docs, "InferenceModel")}
    assert set(models) == {"smollm2", "qwen2-5-7b"}
    smol = models["smollm2"]
    assert smol["metadata"]["namespace"] == "kubeinfer-system" and smol["metadata"]["labels"]["team"] == "llm"
    assert smol["spec"]["replicas"] == 2 and "autoscaling" not in smol["spec"]
    # KEDA mode: the operator's HPA is off, spec.replicas is left to KEDA (scale subresource).
    qwen = models["qwen2-5-7b"]["spec"]
    assert qwen["autoscaling"]["enabled"] is False and "replicas" not in qwen
    scaled = one(all_features_docs, "ScaledObject")
    assert scaled["metadata"]["name"] == "qwen2-5-7b"
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel",
                                                "name": "qwen2-5-7b"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 4)
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "4"
    assert trigger["metadata"]["query"] == (
        'sum(vllm:num_requests_waiting{namespace="kubeinfer-system",model_name="qwen2-5-7b"})')
    # KEDA's HPA gets the behavior the operator's HPA would have (same CRD defaults, same rule).
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    qwen_model = InferenceModel.from_body({**models["qwen2-5-7b"], "spec": {
        **qwen, "autoscaling": {**qwen["autoscaling"], "enabled": True}}})
    assert behavior == render_behavior(qwen_model.spec.autoscaling)


def test_keda_mode_passes_behavior_and_scale_to_zero(render: Render, tmp_path) -> None:
    values = tmp_path / "keda.yaml"
    values.write_text(yaml.safe_dump({"keda": {"enabled": True}, "models": [{"name": "z", "spec": {
        "model": {"source": "hf://org/z"}, "autoscaling": {
            "enabled": True, "minReplicas": 0, "maxReplicas": 3, "targetQueueDepth": 2,
            "scaleUp": {"podsPerPeriod": 2, "percentPerPeriod": 50, "periodSeconds": 5},
            "scaleDown": {"stabilizationWindowSeconds": 10, "periodSeconds": 5}}}}]}))
    docs = render("-f", str(values))
    scaled = one(docs, "ScaledObject", "z")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (0, 3)
    model = one(docs, "InferenceModel", "z")
    spec = model["spec"]
    assert spec["autoscaling"]["enabled"] is False and "replicas" not in spec
    expected = render_behavior(InferenceModel.from_body({**model, "spec": {
        **spec, "autoscaling": {**spec["autoscaling"], "enabled": False}}}).spec.autoscaling)
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == expected
    assert expected["scaleUp"]["policies"] == [{"type": "Pods", "value": 2, "periodSeconds": 5},
                                               {"type": "Percent", "value": 50, "periodSeconds": 5}]
    assert expected["scaleDown"] == {"stabilizationWindowSeconds": 10, "selectPolicy": "Max",
                                     "policies": [{"type": "Pods", "value": 1, "periodSeconds": 5}]}


def test_without_keda_autoscaled_models_keep_the_operators_hpa(render: Render) -> None:
    docs = render("-f", str(ALL_FEATURES), "--set", "keda.enabled=false")
    assert by_kind(docs, "ScaledObject") == []
    qwen = one(docs, "InferenceModel", "qwen2-5-7b")["spec"]
    assert qwen["autoscaling"]["enabled"] is True and qwen["replicas"] == 1


def test_notes_tell_how_to_apply_and_call_a_model(helm: str) -> None:
    result = subprocess.run([helm, "install", "kubeinfer", str(CHART), "--dry-run=client", "--namespace", "ml"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    heredoc = notes.split("cat <<'YAML' | kubectl apply -f -\n", 1)[1].split("   YAML\n", 1)[0]
    applied = yaml.safe_load(textwrap.dedent(heredoc))
    served = applied["spec"]["model"]["servedName"]
    assert f'"model": "{served}"' in notes and f'model="{served}"' in notes, "curl and the SDK use the served name"
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in notes and "from openai import OpenAI" in notes
    assert "kubectl -n ml rollout status deployment/kubeinfer" in notes
