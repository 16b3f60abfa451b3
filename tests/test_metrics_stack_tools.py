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


def test_gateway_counts_the_requests_it_holds_while_no_engine_is_ready() -> None:
    """At zero replicas the load generator's gateway metric is the only queue there is (KEDA scales on it)."""
    import time
    import urllib.request

    import loadgen
    from prometheus_client.parser import text_string_to_metric_families

    engines: list[str] = []
    load = loadgen.LoadGenerator(lambda: engines, "smol", concurrency=3)
    port = load.serve_metrics()

    def pending() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        family = next(f for f in text_string_to_metric_families(text) if f.name == "kubeinfer_gateway_requests_pending")
        (sample,) = family.samples
        assert sample.labels == {"model_name": "smol"}
        return sample.value

    try:
        assert pending() == 0
        load.start()
        deadline = time.monotonic() + 10
        while pending() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pending() == 3
    finally:
        load.close(wait=5)
    assert load.stats.pending == 0 and load.stats.sent == 0
