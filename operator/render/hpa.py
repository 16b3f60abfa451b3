"""The autoscaling/v2 HPA: scales the Deployment on average queue depth (waiting requests per pod)."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.render.common import metadata
from kubeinfer.operator.spec import Autoscaling, InferenceModel, ScalingRule


def behavior_rule(rule: ScalingRule, max_replicas: int) -> dict[str, Any]:
    """An HPA scaling rule; with both a pod and a percent limit the larger step wins (selectPolicy Max).

    podsPerPeriod unset means maxReplicas: one evaluation may go to whatever count the metric asks for
    (the HPA's own default, 4 pods or 100% per 15 s, takes 0->8 several periods; ours takes one).
    """
    policies = [{"type": "Pods", "value": rule.pods_per_period or max_replicas, "periodSeconds": rule.period_seconds}]
    if rule.percent_per_period is not None:
        policies.append({"type": "Percent", "value": rule.percent_per_period, "periodSeconds": rule.period_seconds})
    return {"stabilizationWindowSeconds": rule.stabilization_window_seconds, "selectPolicy": "Max",
            "policies": policies}


def render_behavior(autoscaling: Autoscaling) -> dict[str, Any]:
    """`spec.behavior` of the HPA (also what the chart's KEDA mode puts in the ScaledObject)."""
    return {"scaleUp": behavior_rule(autoscaling.scale_up, autoscaling.max_replicas),
            "scaleDown": behavior_rule(autoscaling.scale_down, autoscaling.max_replicas)}


def render_hpa(im: InferenceModel, metric_name: str) -> dict[str, Any] | None:
    """None when autoscaling is off (the operator then deletes an HPA it made earlier)."""
    autoscaling = im.spec.autoscaling
    if not autoscaling.enabled:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(im),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": im.name},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": metric_name},
                    "target": {"type": "AverageValue", "averageValue": str(autoscaling.target_queue_depth)},
                },
            }],
            "behavior": render_behavior(autoscaling),
        },
    }
