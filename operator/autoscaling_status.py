"""The `Autoscaling` condition and `status.autoscaling`, derived from the autoscaler's own status (pure).

The autoscaler is the operator's HPA (`spec.autoscaling.enabled`) or, in the chart's KEDA mode, a
ScaledObject on the InferenceModel's scale subresource (KEDA then runs its own HPA, `keda-hpa-<name>`).

- HPA: `True` while the HPA reads its metric (`ScalingActive=True`) and can scale (`AbleToScale`);
  otherwise `False` with the HPA's own reason and message (e.g. `FailedGetPodsMetric`: "unable to get
  metric vllm_num_requests_waiting: no custom metrics API (custom.metrics.k8s.io) registered").
  `Unknown` (reason `Pending`) until the HPA controller has looked at it once.
- KEDA: the ScaledObject's `Ready` condition (KEDA sets it `False` when its trigger cannot be read),
  plus KEDA's HPA where it reports a failure to read the external metric. KEDA's HPA reports
  `ScalingActive=False, ScalingDisabled` while KEDA holds the target at zero: that is KEDA working.

Broken autoscaling is a *degradation*, not an outage: the pods that run still serve, so `Ready`
stays as it is and the phase follows serving (as for one crash-looping pod beside a ready one), but
`Degraded` turns `True` with the autoscaler's reason (serving, not scaling; reconcile.py merges it).
"""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.status import Problem

AUTOSCALING = "Autoscaling"
# KEDA's HPA reason while KEDA keeps the target at zero replicas (not a failure).
KEDA_IDLE_REASONS = ("ScalingDisabled",)


def _conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _verdict(ok: bool | None, reason: str, message: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": AUTOSCALING, "status": status, "reason": reason or "Unknown", "message": message or ""}


def hpa_verdict(hpa: dict[str, Any] | None) -> dict[str, Any]:
    """The Autoscaling condition (without times) from an autoscaling/v2 HPA."""
    if hpa is None:
        return _verdict(None, "Pending", "the HorizontalPodAutoscaler does not exist yet")
    conditions = _conditions(hpa)
    able, active = conditions.get("AbleToScale"), conditions.get("ScalingActive")
    if able is None and active is None:
        return _verdict(None, "Pending", "the HPA controller has not evaluated the HorizontalPodAutoscaler yet")
    for failed in (able, active):
        if failed is not None and failed.get("status") == "False":
            return _verdict(False, failed.get("reason", ""), failed.get("message", ""))
    if active is not None and active.get("status") == "True":
        return _verdict(True, active.get("reason", "ValidMetricFound"), active.get("message", ""))
    return _verdict(None, "Pending", "the HPA has not read its metric yet")


def keda_verdict(scaled_object: dict[str, Any], keda_hpa: dict[str, Any] | None) -> dict[str, Any]:
    """The Autoscaling condition from a KEDA ScaledObject (and the HPA KEDA made for it)."""
    conditions = _conditions(scaled_object)
    ready = conditions.get("Ready")
    if ready is None or ready.get("status") == "Unknown":
        return _verdict(None, (ready or {}).get("reason") or "Pending", (ready or {}).get("message")
                        or "KEDA has not reconciled the ScaledObject yet")
    if ready.get("status") == "False":
        return _verdict(False, ready.get("reason", ""), ready.get("message", ""))
    hpa = _conditions(keda_hpa)
    for kind in ("AbleToScale", "ScalingActive"):
        failed = hpa.get(kind)
        if failed is not None and failed.get("status") == "False" and failed.get("reason") not in KEDA_IDLE_REASONS:
            return _verdict(False, failed.get("reason", ""), failed.get("message", ""))
    active = conditions.get("Active") or {}
    idle = active.get("status") == "False"
    return _verdict(True, "ScaledObjectReady", "KEDA reads its trigger" + (
        " (inactive: scaled to its minimum)" if idle else ""))


def _metric_value(hpa: dict[str, Any]) -> str | None:
    """The first metric's current value as the HPA last saw it (a Kubernetes quantity string)."""
    for metric in (hpa.get("status") or {}).get("currentMetrics") or []:
        for source in ("pods", "external", "object", "resource", "containerResource"):
            current = (metric.get(source) or {}).get("current") or {}
            value = current.get("averageValue") or current.get("value")
            if value is not None:
                return str(value)
    return None


def _metric_name(hpa: dict[str, Any]) -> str | None:
    for metric in (hpa.get("spec") or {}).get("metrics") or []:
        for source in ("pods", "external", "object"):
            name = ((metric.get(source) or {}).get("metric") or {}).get("name")
            if name:
                return name
    return None


def autoscaling_summary(mode: str, name: str, hpa: dict[str, Any] | None) -> dict[str, Any]:
    """`status.autoscaling`: who scales, and what its HPA last saw and wants."""
    summary: dict[str, Any] = {"mode": mode, "autoscaler": name}
    if hpa is None:
        return summary
    status = hpa.get("status") or {}
    spec = hpa.get("spec") or {}
    for key, value in (("currentReplicas", status.get("currentReplicas")),
                       ("desiredReplicas", status.get("desiredReplicas")),
                       ("minReplicas", spec.get("minReplicas")), ("maxReplicas", spec.get("maxReplicas")),
                       ("metric", _metric_name(hpa)), ("currentMetricValue", _metric_value(hpa)),
                       ("lastScaleTime", status.get("lastScaleTime"))):
        if value is not None:
            summary[key] = value
    return summary


def derive(mode: str | None, autoscaler: dict[str, Any] | None, hpa: dict[str, Any] | None,
           name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(Autoscaling condition without times, status.autoscaling); (None, None) when nothing autoscales.

    mode: "HPA" (autoscaler is the HPA), "KEDA" (autoscaler is the ScaledObject, hpa is KEDA's), or None.
    """
    if mode is None:
        return None, None
    verdict = hpa_verdict(hpa) if mode == "HPA" else keda_verdict(autoscaler or {}, hpa)
    return verdict, autoscaling_summary(mode, name, hpa)


def degradation(verdict: dict[str, Any] | None) -> Problem | None:
    """What Degraded says when autoscaling is broken (serving, not scaling); None otherwise."""
    if verdict is None or verdict["status"] != "False":
        return None
    return Problem(verdict["reason"], f"autoscaling does not work: {verdict['message']}")
