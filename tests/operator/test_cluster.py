"""The operator against a real control plane: kube-apiserver + etcd, controller-manager, scheduler,
and kwok GPU nodes (8 × nvidia.com/gpu each, tainted), with the operator running as a subprocess
under a service account bound to exactly the rules of operator/PERMISSIONS.md."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
from kubeinfer.operator.diff import is_subset
from kubeinfer.operator.render import render_children
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import InferenceModel
from kubernetes.client.exceptions import ApiException

from tests.operator.cluster import Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

IM_API = "kubeinfer.dev/v1alpha1"
SOURCE = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
TEST_SETTINGS = OperatorSettings(engine_image="kubeinfer/engine:test", queue_metric_name="vllm_num_requests_waiting")


def inference_model(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": IM_API, "kind": "InferenceModel", "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"source": SOURCE}, **spec}}


def get_im(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    body = kube.get(IM_API, "InferenceModel", namespace, name)
    assert body is not None
    return body


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def wait_phase(kube: Kube, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = get_im(kube, namespace, name)
        status = body.get("status") or {}
        return body if status.get("phase") == phase and status.get("observedGeneration") == body["metadata"][
            "generation"] else None

    return wait_for(reached, timeout=timeout, what=f"{namespace}/{name} to be {phase}")


def wait_child(kube: Kube, api_version: str, kind: str, namespace: str, name: str,
               check=lambda live: True, timeout: float = 30) -> dict[str, Any]:
    def present() -> dict[str, Any] | None:
        live = kube.get(api_version, kind, namespace, name)
        return live if live is not None and check(live) else None

    return wait_for(present, timeout=timeout, what=f"{kind} {namespace}/{name}")


def wait_gone(kube: Kube, api_version: str, kind: str, namespace: str, name: str, timeout: float = 30) -> None:
    wait_for(lambda: kube.get(api_version, kind, namespace, name) is None, timeout=timeout,
             what=f"{kind} {namespace}/{name} to be deleted")


def expected_children(body: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    return {child.kind: child.manifest for child in render_children(InferenceModel.from_body(body), TEST_SETTINGS)}


def test_children_have_the_exact_fields_and_status_becomes_ready(kube: Kube, namespace: str) -> None:
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": namespace},
                 "stringData": {"api-key": "s3cret"}})
    kube.create(inference_model("smol", namespace, apiKeySecretRef={"name": "keys"}, engine={"maxModelLen": 2048}))
    deployment = wait_child(kube, "apps/v1", "Deployment", namespace, "smol")
    service = wait_child(kube, "v1", "Service", namespace, "smol")
    body = get_im(kube, namespace, "smol")
    expected = expected_children(body)
    assert is_subset(expected["Deployment"], deployment)
    assert is_subset(expected["Service"], service)
    for kind, api_version in (("HorizontalPodAutoscaler", "autoscaling/v2"), ("PodDisruptionBudget", "policy/v1")):
        assert expected[kind] is None and kube.get(api_version, kind, namespace, "smol") is None

    engine = deployment["spec"]["template"]["spec"]["containers"][0]
    assert engine["image"] == "kubeinfer/engine:test"
    assert engine["args"][:2] == ["--model", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert engine["args"][engine["args"].index("--max-model-len"):][:2] == ["--max-model-len", "2048"]
    assert engine["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {"name": "KUBEINFER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}} \
        in engine["env"]
    assert engine["startupProbe"]["httpGet"]["path"] == "/health" and engine["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert deployment["spec"]["replicas"] == 1
    assert service["spec"]["ports"][0].items() >= {"name": "http", "port": 8000, "targetPort": "http"}.items()
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("InferenceModel", body["metadata"]["uid"], True)
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubeinfer-operator"

    # kwok runs the pod on a fake GPU node and reports it Ready.
    ready = wait_phase(kube, namespace, "smol", "Ready")
    status = ready["status"]
    assert status["endpoint"] == f"http://smol.{namespace}.svc:8000/v1"
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)
    assert status["selector"] == "app.kubernetes.io/component=engine,kubeinfer.dev/model=smol"
    assert condition(ready, "Ready")["status"] == "True" and condition(ready, "Degraded")["status"] == "False"
    pod = kube.list("v1", "Pod", namespace, status["selector"])[0]
    node = kube.get("v1", "Node", None, pod["spec"]["nodeName"])
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    wait_for(lambda: any(e["reason"] == "Ready" for e in kube.events(namespace, "smol")), what="a Ready event")

    table = kube.kubectl("get", "im", "smol", "-n", namespace)
    assert table.split("\n")[0].split() == ["NAME", "MODEL", "READY", "REPLICAS", "PHASE", "AUTOSCALING", "ENDPOINT",
                                             "AGE"]
    assert f"http://smol.{namespace}.svc:8000/v1" in table and "Ready" in table
    assert "Autoscaling" not in [c["type"] for c in status["conditions"]] and "autoscaling" not in status
    wide = kube.kubectl("get", "im", "smol", "-n", namespace, "-o", "wide").split("\n")[0].split()
    assert wide[wide.index("AUTOSCALING") + 1:wide.index("AUTOSCALING") + 3] == ["QUEUE", "DESIRED"]


def test_spec_change_rolls_out_new_pods(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("roll", namespace))
    first = wait_phase(kube, namespace, "roll", "Ready")
    old_hash = kube.list("v1", "Pod", namespace, first["status"]["selector"])[0]["metadata"]["labels"][
        "pod-template-hash"]
    kube.patch(IM_API, "InferenceModel", namespace, "roll", {"spec": {"engine": {"maxNumSeqs": 32}}})
    wait_child(kube, "apps/v1", "Deployment", namespace, "roll",
               lambda d: "--max-num-seqs" in d["spec"]["template"]["spec"]["containers"][0]["args"])

    def new_pod_ready() -> bool:
        pods = kube.list("v1", "Pod", namespace, first["status"]["selector"])
        return any(p["metadata"]["labels"]["pod-template-hash"] != old_hash
                   and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
                   for p in pods)

    wait_for(new_pod_ready, timeout=60, what="a Ready pod of the new template")
    after = wait_phase(kube, namespace, "roll", "Ready")
    assert after["status"]["observedGeneration"] == 2


@pytest.mark.parametrize("change, message", [
    ({"model": {"source": "s3://bucket/model"}}, "model.source must be hf://"),
    ({"model": {"source": SOURCE, "cache": {"claimName": "c", "size": "10Gi"}}}, "exactly one of claimName"),
    ({"model": {"source": SOURCE, "cache": {}}}, "exactly one of claimName"),
    ({"engine": {"tensorParallelSize": 4}, "resources": {"gpus": 2}}, "at least engine.tensorParallelSize"),
    ({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}, "minReplicas must not exceed"),
    ({"terminationGracePeriodSeconds": 5, "preStopSleepSeconds": 10}, "greater than preStopSleepSeconds"),
    ({"engine": {"dtype": "int4"}}, 'Unsupported value: "int4"'),
    ({"replicas": -1}, "spec.replicas: Invalid value: -1"),
    ({"engine": {"gpuMemoryUtilization": 1.5}}, "gpuMemoryUtilization"),
    ({"model": {}}, "spec.model.source: Required value"),
])
def test_invalid_resources_are_rejected_with_readable_messages(kube: Kube, crd: dict, change: dict,
                                                               message: str) -> None:
    manifest = inference_model("bad", "default")
    manifest["spec"].update(change)
    with pytest.raises(ApiException) as raised:
        kube.create(manifest)
    assert raised.value.status == 422
    assert message in json.loads(raised.value.body)["message"], raised.value.body


def test_a_name_that_cannot_name_a_service_is_rejected(kube: Kube, crd: dict) -> None:
    with pytest.raises(ApiException) as raised:
        kube.create(inference_model("llama.v2", "default"))
    assert "must be a DNS-1035 label" in json.loads(raised.value.body)["message"]


def test_drift_is_restored(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("drift", namespace))
    deployment = wait_child(kube, "apps/v1", "Deployment", namespace, "drift")
    service = wait_child(kube, "v1", "Service", namespace, "drift")
    kube.patch("apps/v1", "Deployment", namespace, "drift", {"spec": {"progressDeadlineSeconds": 99}})
    kube.delete("v1", "Service", namespace, "drift")
    wait_child(kube, "apps/v1", "Deployment", namespace, "drift",
               lambda d: d["spec"]["progressDeadlineSeconds"] == deployment["spec"]["progressDeadlineSeconds"])
    wait_child(kube, "v1", "Service", namespace, "drift",
               lambda s: s["metadata"]["uid"] != service["metadata"]["uid"])
    wait_for(lambda: any(e["reason"] == "DriftCorrected" for e in kube.events(namespace, "drift")),
             what="a DriftCorrected event")


def test_unschedulable_model_is_degraded_with_the_reason(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("huge", namespace, resources={"gpus": 16}))
    body = wait_phase(kube, namespace, "huge", "Degraded")
    degraded = condition(body, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert "nvidia.com/gpu" in degraded["message"]
    assert condition(body, "Ready")["status"] == "False"
    wait_for(lambda: [e for e in kube.events(namespace, "huge") if e["reason"] == "Degraded" and e["type"] == "Warning"],
             what="a Warning event")


def test_kubectl_scale_uses_the_scale_subresource(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("scaled", namespace))
    wait_phase(kube, namespace, "scaled", "Ready")
    kube.kubectl("scale", "im/scaled", "--replicas=3", "-n", namespace)
    wait_child(kube, "apps/v1", "Deployment", namespace, "scaled", lambda d: d["spec"]["replicas"] == 3)
    pdb = wait_child(kube, "policy/v1", "PodDisruptionBudget", namespace, "scaled")
    assert pdb["spec"]["maxUnavailable"] == 1
    wait_for(lambda: (get_im(kube, namespace, "scaled").get("status") or {}).get("readyReplicas") == 3,
             timeout=60, what="3 ready replicas")
    scale = kube.kubectl("get", "im/scaled", "-n", namespace, "--subresource=scale", "-o",
                         "jsonpath={.spec.replicas} {.status.replicas} {.status.selector}")
    assert scale == "3 3 app.kubernetes.io/component=engine,kubeinfer.dev/model=scaled"
    kube.kubectl("scale", "im/scaled", "--replicas=1", "-n", namespace)
    wait_gone(kube, "policy/v1", "PodDisruptionBudget", namespace, "scaled")


def test_autoscaling_hands_replicas_to_the_hpa(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("auto", namespace, replicas=2))
    wait_child(kube, "apps/v1", "Deployment", namespace, "auto", lambda d: d["spec"]["replicas"] == 2)
    kube.patch(IM_API, "InferenceModel", namespace, "auto", {"spec": {"autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4}}})
    hpa = wait_child(kube, "autoscaling/v2", "HorizontalPodAutoscaler", namespace, "auto")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "auto"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert hpa["spec"]["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}

    def operator_lets_go_of_replicas() -> dict[str, Any] | None:
        live = kube.get("apps/v1", "Deployment", namespace, "auto")
        ours = [m for m in live["metadata"]["managedFields"] if m["manager"] == "kubeinfer-operator"]
        return live if ours and all("f:replicas" not in m["fieldsV1"].get("f:spec", {}) for m in ours) else None

    deployment = wait_for(operator_lets_go_of_replicas, what="the operator to stop owning spec.replicas")
    assert deployment["spec"]["replicas"] == 2, "turning autoscaling on must not reset the replicas to 1"

    # The HPA controller found its target (AbleToScale); the metric itself needs an adapter this cluster lacks.
    def able_to_scale() -> bool:
        live = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, "auto") or {}
        return any(c["type"] == "AbleToScale" and c["status"] == "True"
                   for c in (live.get("status") or {}).get("conditions") or [])

    wait_for(able_to_scale, timeout=45, interval=1, what="the HPA controller to resolve its scale target")
    assert kube.get("apps/v1", "Deployment", namespace, "auto")["spec"]["replicas"] == 2
    kube.patch(IM_API, "InferenceModel", namespace, "auto", {"spec": {"autoscaling": {"enabled": False}, "replicas": 1}})
    wait_gone(kube, "autoscaling/v2", "HorizontalPodAutoscaler", namespace, "auto")
    wait_child(kube, "apps/v1", "Deployment", namespace, "auto", lambda d: d["spec"]["replicas"] == 1)


def test_autoscaling_without_a_metrics_api_is_reported(kube: Kube, namespace: str) -> None:
    """This cluster has no custom metrics API: the model serves (Ready) but says it cannot scale."""
    kube.create(inference_model("noscale", namespace, autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3}))

    def autoscaling_false() -> dict[str, Any] | None:
        body = get_im(kube, namespace, "noscale")
        return body if condition(body, "Autoscaling").get("status") == "False" else None

    body = wait_for(autoscaling_false, timeout=90, interval=1, what="the Autoscaling condition to turn False")
    autoscaling = condition(body, "Autoscaling")
    assert autoscaling["reason"] == "FailedGetPodsMetric"
    assert "custom metrics API" in autoscaling["message"] and "vllm_num_requests_waiting" in autoscaling["message"]
    body = wait_phase(kube, namespace, "noscale", "Ready", timeout=60)
    assert condition(body, "Ready")["status"] == "True", "it serves"
    degraded = condition(body, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "FailedGetPodsMetric"), "but it does not scale"
    summary = body["status"]["autoscaling"]
    assert summary["mode"] == "HPA" and summary["autoscaler"] == "noscale"
    assert (summary["minReplicas"], summary["maxReplicas"], summary["metric"]) == (1, 3, "vllm_num_requests_waiting")
    wait_for(lambda: [e for e in kube.events(namespace, "noscale") if e["type"] == "Warning"
                      and e["reason"] == "AutoscalingFailed" and "FailedGetPodsMetric" in e["message"]],
             what="a Warning event on the transition")
    columns = kube.kubectl("get", "im", "noscale", "-n", namespace)
    assert "FailedGetPodsMetric" in columns.splitlines()[1] and "AUTOSCALING" in columns.splitlines()[0]
    # Autoscaling off: the condition and status.autoscaling go away, Degraded clears.
    kube.patch(IM_API, "InferenceModel", namespace, "noscale", {"spec": {"autoscaling": {"enabled": False}}})

    def cleared() -> dict[str, Any] | None:
        body = get_im(kube, namespace, "noscale")
        status = body.get("status") or {}
        return body if not condition(body, "Autoscaling") and "autoscaling" not in status \
            and condition(body, "Degraded").get("status") == "False" else None

    wait_for(cleared, timeout=30, what="the Autoscaling condition to be removed")


def test_missing_secret_fails_clearly_until_it_exists(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("gated", namespace, model={"source": SOURCE, "tokenSecretRef": {"name": "hf"}}))
    body = wait_phase(kube, namespace, "gated", "Failed")
    degraded = condition(body, "Degraded")
    assert degraded["reason"] == "SecretNotFound"
    assert degraded["message"] == f'secret "hf" (model.tokenSecretRef) not found in namespace {namespace}'
    assert kube.get("apps/v1", "Deployment", namespace, "gated") is None
    wait_for(lambda: [e for e in kube.events(namespace, "gated") if e["type"] == "Warning" and e["reason"] == "Failed"
                      and "SecretNotFound" in e["message"]], what="a Warning event naming the secret")
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": namespace},
                 "stringData": {"token": "hf_x"}})
    wait_phase(kube, namespace, "gated", "Ready")


def test_missing_pvc_and_unappliable_values_fail_with_the_reason(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("nopvc", namespace, model={"source": "pvc://weights/llama"}))
    kube.create(inference_model("badcpu", namespace, resources={"gpus": 1, "requests": {"cpu": "lots"}}))
    missing = condition(wait_phase(kube, namespace, "nopvc", "Failed"), "Degraded")
    assert (missing["reason"], missing["message"]) == (
        "PVCNotFound", f'PersistentVolumeClaim "weights" (model.source) not found in namespace {namespace}')
    rejected = condition(wait_phase(kube, namespace, "badcpu", "Failed"), "Degraded")
    assert rejected["reason"] == "ApplyFailed" and rejected["message"].startswith("Deployment badcpu: ")
    assert "quantities must match the regular expression" in rejected["message"]
    # The operator keeps working for everything else.
    kube.patch(IM_API, "InferenceModel", namespace, "badcpu", {"spec": {"resources": {"requests": {"cpu": "2"}}}})
    wait_phase(kube, namespace, "badcpu", "Ready")


def test_service_monitor_without_its_crd_is_reported_not_fatal(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("mon", namespace, monitoring={"serviceMonitor": {"enabled": True}}))
    body = wait_phase(kube, namespace, "mon", "Ready")
    degraded = wait_for(lambda: condition(get_im(kube, namespace, "mon"), "Degraded")
                        if condition(get_im(kube, namespace, "mon"), "Degraded").get("status") == "True" else None,
                        what="a Degraded condition")
    assert degraded["reason"] == "KindNotServed" and "ServiceMonitor" in degraded["message"]
    assert body["status"]["readyReplicas"] == 1


def test_deleting_the_model_garbage_collects_every_child(kube: Kube, namespace: str) -> None:
    kube.create(inference_model("gone", namespace, replicas=2, model={"source": SOURCE, "cache": {"size": "1Gi"}}))
    children = [("apps/v1", "Deployment", "gone"), ("v1", "Service", "gone"), ("policy/v1", "PodDisruptionBudget", "gone"),
                ("v1", "PersistentVolumeClaim", "gone-model-cache")]
    for api_version, kind, name in children:
        wait_child(kube, api_version, kind, namespace, name)
    kube.delete(IM_API, "InferenceModel", namespace, "gone")
    for api_version, kind, name in children:
        wait_gone(kube, api_version, kind, namespace, name, timeout=90)


def test_restart_and_handover_change_nothing(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    kube.create(inference_model("steady", namespace, replicas=2))
    wait_for(lambda: (get_im(kube, namespace, "steady").get("status") or {}).get("readyReplicas") == 2
             and condition(get_im(kube, namespace, "steady"), "Progressing").get("status") == "False",
             timeout=60, what="a settled model")
    objects = [(IM_API, "InferenceModel", "steady"), ("apps/v1", "Deployment", "steady"), ("v1", "Service", "steady"),
               ("policy/v1", "PodDisruptionBudget", "steady")]

    def versions() -> dict[str, str]:
        return {kind: kube.get(api, kind, namespace, name)["metadata"]["resourceVersion"] for api, kind, name in objects}

    time.sleep(1)
    before = versions()
    standby = OperatorProcess(operator.kubeconfig, operator.log_path.with_name("standby.log"),
                              lease_namespace=operator.env["KUBEINFER_LEASE_NAMESPACE"], identity="standby")
    standby.start()  # a standby answers its liveness probe...

    def holder() -> str:
        lease = kube.get("coordination.k8s.io/v1", "Lease", operator.env["KUBEINFER_LEASE_NAMESPACE"], "kubeinfer-operator")
        return lease["spec"].get("holderIdentity") or ""

    time.sleep(3)
    assert holder() == operator.env["KUBEINFER_IDENTITY"]  # ...but does not lead
    started = time.monotonic()
    assert operator.stop() == 0, "SIGTERM must stop the operator cleanly"
    assert time.monotonic() - started < 15
    wait_for(lambda: holder() == "standby", timeout=5, what="the standby to take the released lease")
    operator.adopt(standby)
    time.sleep(3 * float(operator.env["KUBEINFER_RESYNC_SECONDS"]))  # initial listing + several resyncs
    assert versions() == before
    # ...and the new leader acts.
    kube.patch(IM_API, "InferenceModel", namespace, "steady", {"spec": {"replicas": 1}})
    wait_gone(kube, "policy/v1", "PodDisruptionBudget", namespace, "steady")


def test_losing_the_lease_stops_the_operator(kube: Kube, operator: OperatorProcess) -> None:
    namespace = operator.env["KUBEINFER_LEASE_NAMESPACE"]
    lease = kube.get("coordination.k8s.io/v1", "Lease", namespace, "kubeinfer-operator")
    lease["spec"] |= {"holderIdentity": "thief", "leaseDurationSeconds": 60,
                      "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    kube.resource("coordination.k8s.io/v1", "Lease").replace(body=lease, namespace=namespace)
    assert operator.process is not None
    assert operator.process.wait(timeout=30) == 1, "an operator that lost its lease must stop acting"
    kube.delete("coordination.k8s.io/v1", "Lease", namespace, "kubeinfer-operator")
    operator.start()  # leave a working operator for whatever runs next
