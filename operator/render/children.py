"""Every child an InferenceModel can have, rendered or None ("must not exist")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer.operator.render.common import cache_claim_name
from kubeinfer.operator.render.deployment import render_deployment
from kubeinfer.operator.render.hpa import render_hpa
from kubeinfer.operator.render.pdb import render_pdb
from kubeinfer.operator.render.pvc import render_cache_pvc
from kubeinfer.operator.render.service import render_service
from kubeinfer.operator.render.servicemonitor import render_service_monitor
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import InferenceModel


@dataclass(frozen=True)
class Child:
    api_version: str
    kind: str
    name: str
    manifest: dict[str, Any] | None  # None: delete it if the operator made it earlier


def render_children(im: InferenceModel, settings: OperatorSettings) -> list[Child]:
    """In apply order: the PVC before the pods that mount it, the Deployment before its HPA."""
    return [
        Child("v1", "PersistentVolumeClaim", cache_claim_name(im), render_cache_pvc(im)),
        Child("apps/v1", "Deployment", im.name, render_deployment(im, settings)),
        Child("v1", "Service", im.name, render_service(im)),
        Child("autoscaling/v2", "HorizontalPodAutoscaler", im.name, render_hpa(im, settings.queue_metric_name)),
        Child("policy/v1", "PodDisruptionBudget", im.name, render_pdb(im)),
        Child("monitoring.coreos.com/v1", "ServiceMonitor", im.name, render_service_monitor(im)),
    ]
