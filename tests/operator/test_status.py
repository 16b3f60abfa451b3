"""Status from reality (pure): phases, reasons and condition transition times."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.status import Problem, compute_status, pod_problem

from tests.operator.factories import make_model

IM = make_model({"model": {"source": "hf://org/name"}, "replicas": 2})
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def deployment(replicas: int = 2, ready: int = 0, updated: int = 2, generation: int = 1,
               conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": generation, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": updated, "conditions": conditions or []}}


def pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": status}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready_when_one_replica_is_ready() -> None:
    status = compute_status(IM, deployment(ready=1), [pod(), pod()], None, {}, T0)
    assert status["phase"] == "Ready"
    assert status["endpoint"] == "http://llama.ai.svc:8000/v1"
    assert status["selector"] == "app.kubernetes.io/component=engine,kubeinfer.dev/model=llama"
    assert (status["replicas"], status["readyReplicas"], status["observedGeneration"]) == (2, 1, 3)
    by_type = conditions(status)
    assert by_type["Ready"] | {} == {"type": "Ready", "status": "True", "reason": "ReplicasReady",
                                     "message": "1/2 replicas ready", "lastTransitionTime": T0, "observedGeneration": 3}
    assert by_type["Progressing"]["status"] == "True"
    assert by_type["Degraded"]["status"] == "False"


def test_loading_pending_and_settled() -> None:
    assert compute_status(IM, deployment(), [pod()], None, {}, T0)["phase"] == "Loading"
    assert compute_status(IM, deployment(), [], None, {}, T0)["phase"] == "Pending"
    assert compute_status(IM, None, [], None, {}, T0)["phase"] == "Pending"
    assert compute_status(IM, deployment(replicas=0, updated=0), [], None, {}, T0)["phase"] == "Pending"
    settled = compute_status(IM, deployment(ready=2), [pod(), pod()], None, {}, T0)
    assert conditions(settled)["Progressing"]["status"] == "False"


def test_unschedulable_pod_degrades_with_the_scheduler_message() -> None:
    unschedulable = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}])
    status = compute_status(IM, deployment(), [unschedulable], None, {}, T0)
    assert status["phase"] == "Degraded"
    degraded = conditions(status)["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in degraded["message"]
    assert conditions(status)["Ready"]["reason"] == "Unschedulable"


def test_container_failures_are_named() -> None:
    for reason in ("ImagePullBackOff", "ErrImagePull", "CrashLoopBackOff"):
        failing = pod(containerStatuses=[{"name": "engine", "state": {"waiting": {"reason": reason, "message": "m"}},
                                          "lastState": {"terminated": {"reason": "OOMKilled"}}}])
        assert pod_problem(failing) == Problem(reason, "container engine: m (last exit: OOMKilled)")
    assert pod_problem(pod(containerStatuses=[{"name": "engine", "state": {"waiting": {"reason": "ContainerCreating"}}}])) is None


def test_ready_replica_keeps_phase_ready_but_reports_degraded() -> None:
    failing = pod(containerStatuses=[{"name": "engine", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])
    status = compute_status(IM, deployment(ready=1), [pod(), failing], None, {}, T0)
    assert status["phase"] == "Ready" and conditions(status)["Degraded"]["reason"] == "CrashLoopBackOff"


def test_config_problem_fails() -> None:
    problem = Problem("SecretNotFound", 'secret "hf" not found')
    status = compute_status(IM, deployment(ready=1), [], problem, {}, T0)
    assert status["phase"] == "Failed"
    assert conditions(status)["Degraded"]["reason"] == "SecretNotFound"
    assert conditions(status)["Ready"]["status"] == "False"


def test_deadline_exceeded_degrades() -> None:
    stuck = deployment(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": "ReplicaSet has timed out progressing."}])
    assert compute_status(IM, stuck, [pod()], None, {}, T0)["phase"] == "Degraded"


def test_transition_time_changes_only_when_status_flips() -> None:
    first = compute_status(IM, deployment(), [pod()], None, {}, T0)
    second = compute_status(IM, deployment(), [pod(), pod()], None, first, T1)
    assert second == first  # same state: nothing to write
    third = compute_status(IM, deployment(ready=1), [pod()], None, second, T1)
    by_type = conditions(third)
    assert by_type["Ready"]["lastTransitionTime"] == T1
    assert by_type["Degraded"]["lastTransitionTime"] == T0
