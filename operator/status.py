"""Status from reality: phase, replica counts and conditions from the Deployment and its pods (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer.operator.render.common import endpoint, selector_string
from kubeinfer.operator.spec import InferenceModel

# Container waiting reasons that mean "this will not start by itself".
FAILING_WAIT_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff",
                        "CreateContainerConfigError", "CreateContainerError", "RunContainerError")


@dataclass(frozen=True)
class Problem:
    """Why something is wrong: a CamelCase reason and a sentence for humans."""

    reason: str
    message: str


def pod_problem(pod: dict[str, Any]) -> Problem | None:
    """The first reason this pod cannot serve: unschedulable, image pull, crash loop, bad config."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" \
                and condition.get("reason") == "Unschedulable":
            return Problem("Unschedulable", condition.get("message") or "no node can run the pod")
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILING_WAIT_REASONS:
            detail = waiting.get("message") or waiting["reason"]
            last = ((container.get("lastState") or {}).get("terminated") or {}).get("reason")
            if last:
                detail += f" (last exit: {last})"
            return Problem(waiting["reason"], f"container {container.get('name')}: {detail}")
    return None


def deployment_problem(deployment: dict[str, Any]) -> Problem | None:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return Problem(condition.get("reason") or "ReplicaFailure", condition.get("message") or "")
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return Problem("ProgressDeadlineExceeded", condition.get("message") or "rollout timed out")
    return None


def _condition(kind: str, true: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if true else "False", "reason": reason, "message": message}


def compute_status(im: InferenceModel, deployment: dict[str, Any] | None, pods: list[dict[str, Any]],
                   config_problem: Problem | None, previous: dict[str, Any], now: str) -> dict[str, Any]:
    """The whole `.status`; lastTransitionTime changes only when a condition's status flips."""
    dep_status = (deployment or {}).get("status") or {}
    desired = ((deployment or {}).get("spec") or {}).get("replicas", 0)
    replicas, ready = dep_status.get("replicas", 0), dep_status.get("readyReplicas", 0)
    updated = dep_status.get("updatedReplicas", 0)
    live_pods = [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]
    failure = config_problem or next(filter(None, map(pod_problem, live_pods)), None) \
        or (deployment_problem(deployment) if deployment else None)

    if config_problem:
        phase, why = "Failed", config_problem
    elif deployment is None:
        phase, why = "Pending", Problem("Creating", "the Deployment does not exist yet")
    elif ready >= 1:
        phase, why = "Ready", Problem("ReplicasReady", f"{ready}/{desired} replicas ready")
    elif failure:
        phase, why = "Degraded", failure
    elif desired == 0:
        phase, why = "Pending", Problem("ScaledToZero", "replicas is 0")
    elif live_pods:
        phase, why = "Loading", Problem("Loading", f"0/{desired} replicas ready: pods are starting or loading the model")
    else:
        phase, why = "Pending", Problem("PodsPending", "waiting for pods to be created")

    rolled_out = deployment is not None \
        and dep_status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0) \
        and updated >= desired and ready >= desired and replicas == desired
    progressing = (_condition("Progressing", True, "RollingOut", f"{updated}/{desired} updated, {ready}/{desired} ready")
                   if not rolled_out and not config_problem
                   else _condition("Progressing", False, "Failed" if config_problem else "Settled",
                                   config_problem.message if config_problem else f"{ready}/{desired} replicas ready"))
    conditions = [
        _condition("Ready", phase == "Ready", why.reason, why.message),
        progressing,
        _condition("Degraded", failure is not None, failure.reason if failure else "AsExpected",
                   failure.message if failure else "no problems seen"),
    ]
    old = {c["type"]: c for c in previous.get("conditions") or []}
    for condition in conditions:
        before = old.get(condition["type"])
        same = before is not None and before.get("status") == condition["status"]
        condition["lastTransitionTime"] = before.get("lastTransitionTime", now) if same else now
        condition["observedGeneration"] = im.generation

    return {
        "phase": phase,
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": selector_string(im),
        "endpoint": endpoint(im),
        "observedGeneration": im.generation,
        "conditions": conditions,
    }


def status_changed(new: dict[str, Any], old: dict[str, Any]) -> bool:
    return any(new.get(key) != old.get(key) for key in new)
