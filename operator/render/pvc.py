"""The model-cache PVC the operator creates when `model.cache.size` is set."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.render.common import cache_claim_name, metadata
from kubeinfer.operator.spec import InferenceModel


def render_cache_pvc(im: InferenceModel) -> dict[str, Any] | None:
    cache = im.spec.model.cache
    if cache is None or cache.size is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": list(cache.access_modes),
        "resources": {"requests": {"storage": str(cache.size)}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(im, name=cache_claim_name(im)), "spec": spec}
