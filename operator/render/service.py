"""The Service in front of the engine pods: `http://<name>.<namespace>.svc:8000/v1`."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.render.common import HTTP_PORT, metadata, selector_labels
from kubeinfer.operator.spec import InferenceModel


def render_service(im: InferenceModel) -> dict[str, Any]:
    service = im.spec.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(im, extra_labels=service.labels, annotations=service.annotations),
        "spec": {
            "type": service.type,
            "selector": selector_labels(im),
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }
