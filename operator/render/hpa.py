"""The autoscaling/v2 HPA: scales the Deployment on average queue depth (waiting requests per pod)."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.render.common import metadata
from kubeinfer.operator.spec import InferenceModel, ScalingRule


def _rule(rule: ScalingRule) -> dict[str, Any]:
    return {
        "stabilizationWindowSeconds": rule.stabilization_window_seconds,
        "policies": [{"type": "Pods", "value": rule.pods_per_period, "periodSeconds": rule.period_seconds}],
    }


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
            "behavior": {"scaleUp": _rule(autoscaling.scale_up), "scaleDown": _rule(autoscaling.scale_down)},
        },
    }
