"""The queue-depth autoscaling loop end to end, with real parts only:

real engines (`kubeinfer serve`, bundled SmolLM2 on the CPU) behind kwok's pods (hack/k8s/engine_harness.py,
the stand-in for kubelet + CNI) -> Prometheus (file_sd) -> prometheus-adapter with the chart's own rule
file, registered as the APIService v1beta1.custom.metrics.k8s.io -> the HPA controller of the real
kube-controller-manager -> the Deployment the operator made. A bounded loopback load generator builds
the queue; the test asserts on replica counts over time and on the metric values in the HPA's status,
and writes the timeline as JSON (KUBEINFER_TIMELINE_DIR, else the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# hack/k8s is on sys.path (tests/conftest.py).
from engine_harness import EngineHarness
from kubeinfer.operator.render.common import FIELD_MANAGER
from loadgen import LoadGenerator
from metrics_stack import CUSTOM_METRICS_API, MetricsStack, build_metrics_binaries
from timeline import Timeline, quantity

from tests.operator.cluster import Kube, wait_for
from tests.operator.test_cluster import IM_API, condition, get_im, inference_model, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.autoscaling]

SERVED = "smol"
TARGET = 2  # waiting requests per pod
MAX = 3  # 2 cores: three engines at most


@pytest.fixture(scope="module")
def metrics(k8s_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsStack]:
    needed = ("prometheus", "prometheus-adapter")
    if not all((k8s_cluster.bin_dir / name).is_file() for name in needed):
        if shutil.which("go") is None:
            pytest.skip("the metrics stack needs the Go toolchain (hack/k8s/build-metrics.sh)")
        build_metrics_binaries(*needed)
    stack = MetricsStack(k8s_cluster.plane, tmp_path_factory.mktemp("metrics"))
    try:
        stack.start_prometheus()
        stack.start_prometheus_adapter()
        yield stack
    finally:
        stack.unregister(CUSTOM_METRICS_API)  # later tests expect a cluster without custom metrics
        stack.stop()


def autoscaled_model(name: str, namespace: str) -> dict[str, Any]:
    return inference_model(name, namespace, model={"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
                                                   "servedName": SERVED},
                           autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": MAX,
                                        "targetQueueDepth": TARGET,
                                        "scaleDown": {"stabilizationWindowSeconds": 10, "podsPerPeriod": MAX,
                                                      "periodSeconds": 5}})


def replicas(kube: Kube, namespace: str, name: str) -> tuple[int, int]:
    deployment = kube.get("apps/v1", "Deployment", namespace, name) or {}
    return (deployment.get("spec") or {}).get("replicas", 0), (deployment.get("status") or {}).get("readyReplicas", 0)


def operator_owns_replicas(kube: Kube, namespace: str, name: str) -> bool:
    live = kube.get("apps/v1", "Deployment", namespace, name)
    return any(m["manager"] == FIELD_MANAGER and "f:replicas" in m.get("fieldsV1", {}).get("f:spec", {})
               for m in live["metadata"]["managedFields"])


def hpa_metric(kube: Kube, namespace: str, name: str) -> float | None:
    """The queue depth per pod as the HPA last saw it (its status.currentMetrics)."""
    hpa = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, name) or {}
    for metric in (hpa.get("status") or {}).get("currentMetrics") or []:
        return quantity(((metric.get("pods") or {}).get("current") or {}).get("averageValue"))
    return None


def write_timeline(timeline: Timeline, tmp_path: Path, name: str) -> Path:
    directory = Path(os.environ.get("KUBEINFER_TIMELINE_DIR", tmp_path))
    return timeline.write(directory / f"{name}.json")


def test_hpa_scales_engines_on_queue_depth_and_back(kube: Kube, namespace: str, metrics: MetricsStack,
                                                    tmp_path: Path) -> None:
    kube.create(autoscaled_model("auto", namespace))
    harness = EngineHarness(kube.api, namespace, "app.kubernetes.io/component=engine,kubeinfer.dev/model=auto",
                            SERVED, metrics.sd_file, tmp_path / "engines").start()
    load = LoadGenerator(harness.ready_urls, SERVED, concurrency=8, max_tokens=24)
    timeline = Timeline(kube.get, metrics.query, namespace, "auto", "auto", load).start()
    try:
        wait_phase(kube, namespace, "auto", "Ready", timeout=240)
        # kwok marks pods Ready at once; the engine itself takes a while to load on two busy cores.
        wait_for(lambda: harness.ready_urls(), timeout=400, interval=1, what="the first engine to answer /ready")

        def autoscaling_true() -> dict[str, Any] | None:
            body = get_im(kube, namespace, "auto")
            return body if condition(body, "Autoscaling").get("status") == "True" else None

        body = wait_for(autoscaling_true, timeout=180, interval=1,
                        what=f"the HPA to read its metric through prometheus-adapter\n{metrics.log_tail('prometheus-adapter')}")
        assert condition(body, "Autoscaling")["reason"] == "ValidMetricFound"
        assert condition(body, "Degraded")["status"] == "False"

        load.start()
        wait_for(lambda: replicas(kube, namespace, "auto")[0] == MAX, timeout=240, interval=1,
                 what=f"the HPA to scale to {MAX} on the queue; last samples {timeline.samples[-3:]}")
        wait_for(lambda: len(harness.ready_urls()) == MAX and replicas(kube, namespace, "auto")[1] == MAX,
                 timeout=300, interval=1, what=f"{MAX} engines ready")
        # With three engines the queue drains below the target while the load goes on.
        wait_for(lambda: (hpa_metric(kube, namespace, "auto") or TARGET) < TARGET, timeout=180, interval=1,
                 what="the queue to drain below the target")
        assert not operator_owns_replicas(kube, namespace, "auto")
        load.stop()
        wait_for(lambda: replicas(kube, namespace, "auto")[0] == 1, timeout=180, interval=1,
                 what="the scale-down back to minReplicas")
        timeline.samples.append(timeline.sample())
    finally:
        timeline.stop()
        load.stop(wait=10)
        harness.stop()
        path = write_timeline(timeline, tmp_path, "hpa-timeline")
        print(f"\ntimeline: {path}")

    samples = [s for s in timeline.samples if "error" not in s]
    seen = [quantity(s["hpa_metric"]) for s in samples if s["hpa_metric"] is not None]
    assert max(seen) > TARGET, f"the HPA saw the queue build up: {seen}"
    counts = [s["replicas"] for s in samples]
    first_max = counts.index(MAX)
    assert 1 in counts[:first_max] and counts[-1] == 1, counts
    assert harness.started_total >= MAX, "every new pod got an engine"
    # A request sent in the instant its engine's pod goes away may fail (as with a real Service's endpoints).
    assert load.stats.ok > 0 and load.stats.failed <= 2 + load.stats.sent // 10, load.stats
    hpa = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, "auto")
    assert hpa["status"]["currentMetrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert get_im(kube, namespace, "auto")["spec"].get("replicas", 1) == 1, "nobody wrote the model's replicas"
    assert not operator_owns_replicas(kube, namespace, "auto")
    json.dumps(timeline.samples)  # the timeline is plain JSON


def test_removing_the_adapter_turns_autoscaling_false_with_the_reason(kube: Kube, namespace: str,
                                                                      metrics: MetricsStack) -> None:
    kube.create(autoscaled_model("cut", namespace))

    def autoscaling(status: str) -> dict[str, Any] | None:
        body = get_im(kube, namespace, "cut")
        return condition(body, "Autoscaling") if condition(body, "Autoscaling").get("status") == status else None

    # No engine runs for this model: the adapter answers, but with no series for its pods.
    wait_for(lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, "cut"), what="the HPA")
    metrics.unregister(CUSTOM_METRICS_API)
    try:
        failed = wait_for(lambda: autoscaling("False"), timeout=90, interval=1, what="Autoscaling False")
        assert failed["reason"] == "FailedGetPodsMetric"
        assert "custom metrics" in failed["message"]
        assert condition(get_im(kube, namespace, "cut"), "Degraded")["reason"] == "FailedGetPodsMetric"
    finally:
        metrics.reregister(CUSTOM_METRICS_API)
    kube.delete(IM_API, "InferenceModel", namespace, "cut")
