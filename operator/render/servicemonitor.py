"""An optional prometheus-operator ServiceMonitor for the engine's /metrics."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.render.common import metadata, selector_labels
from kubeinfer.operator.spec import InferenceModel


def render_service_monitor(im: InferenceModel) -> dict[str, Any] | None:
    monitor = im.spec.monitoring.service_monitor
    if not monitor.enabled:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(im, extra_labels=monitor.labels),
        "spec": {
            "selector": {"matchLabels": selector_labels(im)},
            "namespaceSelector": {"matchNames": [im.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": monitor.interval}],
        },
    }
