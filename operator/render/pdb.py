"""The PodDisruptionBudget: at most one engine pod down at a time, once there is more than one."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.render.common import metadata, selector_labels
from kubeinfer.operator.spec import InferenceModel


def wants_pdb(im: InferenceModel) -> bool:
    spec = im.spec
    return spec.autoscaling.min_replicas > 1 if spec.autoscaled else spec.replicas > 1


def render_pdb(im: InferenceModel) -> dict[str, Any] | None:
    """None with a single replica: a PDB would then block every node drain."""
    if not wants_pdb(im):
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(im),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(im)}},
    }
