"""The Argo CD health check, run by a real Lua 5.4 interpreter (lupa), and the Argo CD manifests."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.delivery.tools import REPO

ARGOCD = REPO / "manifests" / "argocd"
HEALTH_LUA = ARGOCD / "health-inferencemodel.lua"


@pytest.fixture(scope="module")
def health_check():
    """Argo CD's contract: a chunk that reads the global `obj` and returns {status, message}."""
    lupa = pytest.importorskip("lupa.lua54", reason="lupa (a dev extra) runs the Lua health check")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    chunk = lua.execute(f"return function() {HEALTH_LUA.read_text()} end")

    def run(obj: dict[str, Any]) -> tuple[str, str]:
        lua.globals().obj = lua.table_from(obj, recursive=True)
        result = chunk()
        return result["status"], result["message"]

    return run


def model(generation: int = 1, **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel",
                            "metadata": {"name": "m", "generation": generation}, "spec": {}}
    if status:
        body["status"] = status
    return body


def condition(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


CASES = {
    "no status yet": (model(), "Progressing", "Waiting for the kubeinfer operator"),
    "older generation observed": (
        model(generation=3, observedGeneration=2, phase="Ready", conditions=[condition("Ready", "True")]),
        "Progressing", "generation 3"),
    "loading": (
        model(observedGeneration=1, phase="Loading", replicas=1, readyReplicas=0, conditions=[
            condition("Ready", "False", "Loading", "0/1 replicas ready"),
            condition("Progressing", "True", "PodsStarting", "downloading weights")]),
        "Progressing", "downloading weights"),
    "ready": (
        model(observedGeneration=1, phase="Ready", replicas=2, readyReplicas=2, conditions=[
            condition("Ready", "True", "ReplicasReady", "serving"), condition("Degraded", "False")]),
        "Healthy", "serving (2/2 replicas ready)"),
    "degraded condition": (
        model(observedGeneration=1, phase="Degraded", conditions=[
            condition("Ready", "False"), condition("Degraded", "True", "Unschedulable", "needs 8 GPUs, nodes have 4")]),
        "Degraded", "needs 8 GPUs, nodes have 4"),
    "degraded wins over ready": (
        model(observedGeneration=1, phase="Ready", conditions=[
            condition("Ready", "True"), condition("Degraded", "True", "CrashLoopBackOff")]),
        "Degraded", "CrashLoopBackOff"),
    "failed phase without conditions": (model(observedGeneration=1, phase="Failed"), "Degraded", "Failed"),
    "no generation in metadata": (
        {"metadata": {"name": "m"}, "status": {"phase": "Ready", "conditions": [condition("Ready", "True")]}},
        "Healthy", "Ready"),
}


@pytest.mark.parametrize("obj, expected_status, message_part", CASES.values(), ids=CASES.keys())
def test_health_check_maps_status(health_check, obj: dict, expected_status: str, message_part: str) -> None:
    status, message = health_check(obj)
    assert status == expected_status
    assert message_part in message


def test_argocd_cm_embeds_the_same_lua() -> None:
    configmap = yaml.safe_load((ARGOCD / "argocd-cm-health.yaml").read_text())
    assert configmap["data"]["resource.customizations.health.kubeinfer.dev_InferenceModel"] == HEALTH_LUA.read_text()


def test_application_and_applicationset_point_at_real_paths() -> None:
    app = yaml.safe_load((ARGOCD / "application.yaml").read_text())
    assert app["kind"] == "Application" and (REPO / app["spec"]["source"]["path"] / "Chart.yaml").exists()
    appset = yaml.safe_load((ARGOCD / "applicationset-models.yaml").read_text())
    source = appset["spec"]["template"]["spec"]["source"]
    for element in appset["spec"]["generators"][0]["list"]["elements"]:
        manifest = yaml.safe_load((REPO / source["path"] / element["file"]).read_text())
        assert manifest["kind"] == "InferenceModel" and manifest["metadata"]["name"] == element["model"]


def operator_status(deployment_status: dict[str, Any] | None, pods: list[dict[str, Any]],
                    config_problem: Any = None) -> dict[str, Any]:
    """An InferenceModel carrying the status the operator's own (pure) status function writes."""
    from kubeinfer.operator.spec import InferenceModel
    from kubeinfer.operator.status import compute_status

    body = {"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {"model": {"source": "hf://org/m"}}}
    deployment = None if deployment_status is None else {
        "metadata": {"generation": 1}, "spec": {"replicas": 1}, "status": deployment_status}
    body["status"] = compute_status(InferenceModel.from_body(body), deployment, pods, config_problem, {},
                                    "2026-01-01T00:00:00Z")
    return body


def pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m-1"}, "status": status}


def test_health_check_reads_the_operators_real_status(health_check) -> None:
    from kubeinfer.operator.status import Problem

    ready = {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}
    assert health_check(operator_status(ready, [pod()]))[0] == "Healthy"
    loading = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1}
    assert health_check(operator_status(loading, [pod(phase="Running")]))[0] == "Progressing"
    assert health_check(operator_status(None, []))[0] == "Progressing"
    unschedulable = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": "0/3 nodes: Insufficient nvidia.com/gpu"}])
    status, message = health_check(operator_status(loading, [unschedulable]))
    assert (status, message) == ("Degraded", "0/3 nodes: Insufficient nvidia.com/gpu")
    status, message = health_check(operator_status(None, [], Problem("SecretNotFound", "secret hf-token not found")))
    assert (status, message) == ("Degraded", "secret hf-token not found")
