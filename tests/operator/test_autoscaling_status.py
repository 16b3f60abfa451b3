"""The Autoscaling condition and status.autoscaling from the HPA's / ScaledObject's status (pure)."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.autoscaling_status import (
    autoscaling_summary,
    degradation,
    derive,
    hpa_verdict,
    keda_verdict,
)

NO_API = ("unable to get metric vllm_num_requests_waiting: unable to fetch metrics from custom metrics API: "
          "no custom metrics API (custom.metrics.k8s.io) registered")


def hpa(*conditions: tuple[str, str, str, str], current: str | None = None, desired: int = 2) -> dict[str, Any]:
    status: dict[str, Any] = {"currentReplicas": 1, "desiredReplicas": desired,
                              "conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                             for t, s, r, m in conditions]}
    if current is not None:
        status["currentMetrics"] = [{"type": "Pods", "pods": {"metric": {"name": "vllm_num_requests_waiting"},
                                                              "current": {"averageValue": current}}}]
    return {"spec": {"minReplicas": 1, "maxReplicas": 3, "metrics": [
        {"type": "Pods", "pods": {"metric": {"name": "vllm_num_requests_waiting"}}}]}, "status": status}


ABLE = ("AbleToScale", "True", "ReadyForNewScale", "recommended size matches current size")


def test_hpa_that_reads_its_metric_is_true() -> None:
    verdict = hpa_verdict(hpa(ABLE, ("ScalingActive", "True", "ValidMetricFound",
                                     "the HPA was able to successfully calculate a replica count")))
    assert verdict == {"type": "Autoscaling", "status": "True", "reason": "ValidMetricFound",
                       "message": "the HPA was able to successfully calculate a replica count"}


def test_hpa_without_custom_metrics_api_is_false_with_its_reason() -> None:
    verdict = hpa_verdict(hpa(("AbleToScale", "True", "SucceededGetScale", "the HPA controller was able to get"),
                              ("ScalingActive", "False", "FailedGetPodsMetric", NO_API)))
    assert (verdict["status"], verdict["reason"], verdict["message"]) == ("False", "FailedGetPodsMetric", NO_API)
    problem = degradation(verdict)
    assert problem is not None and problem.reason == "FailedGetPodsMetric" and NO_API in problem.message


def test_hpa_unable_to_scale_is_false() -> None:
    verdict = hpa_verdict(hpa(("AbleToScale", "False", "FailedGetScale", "deployments/scale not found")))
    assert (verdict["status"], verdict["reason"]) == ("False", "FailedGetScale")


def test_hpa_not_evaluated_yet_is_unknown_and_not_a_degradation() -> None:
    for live in (None, hpa()):
        verdict = hpa_verdict(live)
        assert (verdict["status"], verdict["reason"]) == ("Unknown", "Pending")
        assert degradation(verdict) is None


def test_summary_has_replicas_and_the_metric_the_hpa_saw() -> None:
    summary = autoscaling_summary("HPA", "m", hpa(ABLE, current="2500m", desired=3))
    assert summary == {"mode": "HPA", "autoscaler": "m", "currentReplicas": 1, "desiredReplicas": 3,
                       "minReplicas": 1, "maxReplicas": 3, "metric": "vllm_num_requests_waiting",
                       "currentMetricValue": "2500m"}


def scaled_object(*conditions: tuple[str, str, str, str]) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                      for t, s, r, m in conditions]}}


def test_keda_ready_is_true_even_at_zero() -> None:
    so = scaled_object(("Ready", "True", "ScaledObjectReady", "ScaledObject is defined correctly and is ready"),
                       ("Active", "False", "ScalerNotActive", "Scaling is not performed because triggers are not active"))
    idle_hpa = hpa(ABLE, ("ScalingActive", "False", "ScalingDisabled", "scaling is disabled since the replica count of the target is zero"))
    verdict = keda_verdict(so, idle_hpa)
    assert verdict["status"] == "True" and "scaled to its minimum" in verdict["message"]


def test_keda_not_ready_is_false_with_its_reason() -> None:
    so = scaled_object(("Ready", "False", "KEDAScalerFailed", "error getting metric: connection refused"))
    verdict = keda_verdict(so, None)
    assert (verdict["status"], verdict["reason"], verdict["message"]) == (
        "False", "KEDAScalerFailed", "error getting metric: connection refused")


def test_keda_hpa_without_external_metrics_api_is_false() -> None:
    so = scaled_object(("Ready", "True", "ScaledObjectReady", "ok"))
    broken = hpa(ABLE, ("ScalingActive", "False", "FailedGetExternalMetric", "no external metrics API registered"))
    assert keda_verdict(so, broken)["reason"] == "FailedGetExternalMetric"


def test_nothing_autoscales() -> None:
    assert derive(None, None, None, name="m") == (None, None)
    verdict, summary = derive("KEDA", scaled_object(), None, name="m")
    assert verdict["status"] == "Unknown" and summary == {"mode": "KEDA", "autoscaler": "m"}
