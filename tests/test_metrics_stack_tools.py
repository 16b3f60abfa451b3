"""The autoscaling loop's helpers that need no cluster: the adapter config comes from the chart's own rule
file, HPA quantities parse, file_sd labels are valid Prometheus label names."""

from __future__ import annotations

# hack/k8s is on sys.path (tests/conftest.py)
import engine_harness
import metrics_stack
import timeline
import yaml

from tests.conftest import REPO


def test_adapter_config_is_the_charts_rule_file() -> None:
    rule = yaml.safe_load((REPO / "charts" / "kubeinfer" / "files" / "prometheus-adapter-rule.yaml").read_text())
    assert metrics_stack.ADAPTER_RULE.is_relative_to(REPO / "charts")
    assert metrics_stack.adapter_config() == {"rules": [rule]}
    renamed = metrics_stack.adapter_config("queue")["rules"][0]
    assert renamed["name"] == {"matches": rule["name"]["matches"], "as": "queue"}


def test_hpa_quantities() -> None:
    assert timeline.quantity("2500m") == 2.5
    assert timeline.quantity("3") == 3.0
    assert timeline.quantity("1k") == 1000.0
    assert timeline.quantity(None) is None


def test_pod_labels_become_prometheus_label_names() -> None:
    assert engine_harness.prometheus_label("kubeinfer.dev/model") == "kubeinfer_dev_model"
    assert engine_harness.prometheus_label("app.kubernetes.io/component") == "app_kubernetes_io_component"
