"""Names, labels and owner references shared by every child of an InferenceModel."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.spec import InferenceModel

GROUP = "kubeinfer.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceModel"
PLURAL = "inferencemodels"

FIELD_MANAGER = "kubeinfer-operator"
MANAGED_BY = "kubeinfer-operator"
MODEL_LABEL = "kubeinfer.dev/model"
HASH_ANNOTATION = "kubeinfer.dev/applied-hash"
HTTP_PORT = 8000
COMPONENT = "engine"


def selector_labels(im: InferenceModel) -> dict[str, str]:
    """The immutable Deployment selector; also the Service, PDB and scale-subresource selector."""
    return {"app.kubernetes.io/component": COMPONENT, MODEL_LABEL: im.name}


def labels(im: InferenceModel) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubeinfer",
        "app.kubernetes.io/instance": im.name,
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        MODEL_LABEL: im.name,
    }


def selector_string(im: InferenceModel) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(im).items()))


def endpoint(im: InferenceModel) -> str:
    return f"http://{im.name}.{im.namespace}.svc:{HTTP_PORT}/v1"


def cache_claim_name(im: InferenceModel) -> str:
    return f"{im.name}-model-cache"


def owner_reference(im: InferenceModel) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": im.name,
        "uid": im.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(im: InferenceModel, name: str | None = None, extra_labels: dict[str, str] | None = None,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name or im.name,
        "namespace": im.namespace,
        "labels": {**(extra_labels or {}), **labels(im)},
        "ownerReferences": [owner_reference(im)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta
