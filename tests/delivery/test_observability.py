"""Dashboard, prometheus-adapter rule and scrape config read the series the engine really exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.delivery.conftest import CHART, Render, one

DASHBOARD = CHART / "dashboards" / "kubeinfer.json"
ADAPTER_VALUES = CHART / "files" / "prometheus-adapter-values.yaml"
SERIES = re.compile(r"vllm:[a-z0-9_]+")


@pytest.fixture(scope="module")
def engine_series() -> dict[str, set[str]]:
    """Sample name → label names, from a real ServingMetrics registry of the engine."""
    from kubeinfer.engine.metrics import EngineSnapshot, ServingMetrics

    metrics = ServingMetrics(lambda: EngineSnapshot(num_waiting=3, num_running=2, kv_cache_usage=0.5,
                                                    num_gpu_blocks=10, block_size=16), lambda: "smollm2")
    metrics.observe_first_token(0.1)
    metrics.observe_token_interval(0.02, 3)
    metrics.observe_finished("stop", 1.0, 0.01)
    text = generate_latest(metrics.registry).decode()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_queries_only_series_the_engine_exports(engine_series: dict[str, set[str]]) -> None:
    used = {name for expr in dashboard_exprs() for name in SERIES.findall(expr)}
    assert used, "the dashboard queries nothing"
    assert used <= set(engine_series), f"unknown series: {used - set(engine_series)}"
    for name in used:
        assert "model_name" in engine_series[name], name


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "model"}
    text = "\n".join(dashboard_exprs())
    for needed in ("vllm:request_success_total", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                   "vllm:generation_tokens_total"):
        assert needed in text, needed
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, model_name)" in text
    for panel in dashboard["panels"]:
        exprs = "".join(t["expr"] for t in panel["targets"])
        assert re.search(r"by \((le, )?model_name", exprs), panel["title"]  # one series per model
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_configmap_carries_the_file(all_features_docs: list[dict]) -> None:
    configmap = one(all_features_docs, "ConfigMap", "kubeinfer-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(configmap["data"]["kubeinfer.json"]) == json.loads(DASHBOARD.read_text())


def test_adapter_rule_publishes_the_metric_the_operator_scales_on(all_features_docs: list[dict],
                                                                  engine_series: dict[str, set[str]]) -> None:
    from kubeinfer.operator.settings import OperatorSettings

    metric = OperatorSettings.model_fields["queue_metric_name"].default
    configmap = one(all_features_docs, "ConfigMap", "kubeinfer-prometheus-adapter")
    [rule] = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    [snippet_rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule == snippet_rule, "the ConfigMap and the values snippet must publish the same rule"
    assert rule["name"]["as"] == metric
    series = rule["seriesQuery"].split("{")[0]
    assert series in engine_series and re.fullmatch(rule["name"]["matches"], series)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_adapter_rule_follows_a_renamed_metric(render: Render) -> None:
    docs = render("--set", "prometheusAdapter.enabled=true", "--set", "operator.queueMetricName=llm_queue")
    [rule] = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == "llm_queue"
