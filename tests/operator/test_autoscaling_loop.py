"""The queue-depth autoscaling loop end to end, with real parts only:

real engines (`kubeinfer serve`, bundled SmolLM2 on the CPU) behind kwok's pods (hack/k8s/engine_harness.py,
the stand-in for kubelet + CNI) -> Prometheus (file_sd) -> prometheus-adapter with the chart's own rule
file, registered as the APIService v1beta1.custom.metrics.k8s.io -> the HPA controller of the real
kube-controller-manager -> the Deployment the operator made. A bounded loopback load generator builds
the queue; the test asserts on replica counts over time and on the metric values in the HPA's status,
and writes the timeline as JSON (KUBEINFER_TIMELINE_DIR, else the test's tmp dir).

KEDA mode: the chart's own ScaledObject (rendered by the real helm) on the InferenceModel's scale
subresource -> the real KEDA operator (0 <-> 1, its HPA) and metrics apiserver (registered as
v1beta1.external.metrics.k8s.io) -> the same HPA controller, with minReplicas 0: the model scales to
zero while idle and back when requests arrive, counted by the load generator's gateway metric.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# hack/k8s is on sys.path (tests/conftest.py).
from engine_harness import EngineHarness
from kubeinfer.operator.render.common import FIELD_MANAGER
from loadgen import LoadGenerator
from metrics_stack import CUSTOM_METRICS_API, EXTERNAL_METRICS_API, MetricsStack, build_metrics_binaries
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


REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeinfer"


def keda_version() -> str:
    versions = (REPO / "hack" / "k8s" / "versions.env").read_text()
    return next(line.split("=", 1)[1].strip() for line in versions.splitlines() if line.startswith("KEDA_VERSION="))


@pytest.fixture(scope="module")
def keda(k8s_cluster, metrics: MetricsStack) -> Iterator[MetricsStack]:
    if not all((k8s_cluster.bin_dir / name).is_file() for name in ("keda-operator", "keda-adapter")):
        if shutil.which("go") is None:
            pytest.skip("KEDA needs the Go toolchain (hack/k8s/build-metrics.sh keda)")
        build_metrics_binaries("keda")
    metrics.start_keda(keda_version())
    try:
        yield metrics
    finally:
        metrics.unregister(EXTERNAL_METRICS_API)


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


def replicas_writers(kube: Kube, namespace: str, name: str) -> set[str]:
    """Who has written the InferenceModel's spec.replicas (its managedFields)."""
    live = get_im(kube, namespace, name)
    return {m["manager"] for m in live["metadata"]["managedFields"]
            if "f:replicas" in m.get("fieldsV1", {}).get("f:spec", {})}


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


def chart_keda_objects(k8s_cluster, namespace: str, name: str, prometheus_url: str, query: str,
                       autoscaling: dict[str, Any]) -> list[dict[str, Any]]:
    """The InferenceModel and ScaledObject that the chart renders for one `models:` entry in KEDA mode."""
    values = {"keda": {"enabled": True, "serverAddress": prometheus_url, "query": query, "pollingInterval": 2,
                       "cooldownPeriod": 15},
              "models": [{"name": name, "namespace": namespace,
                          "spec": {"model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "servedName": SERVED},
                                   "autoscaling": autoscaling}}]}
    out = subprocess.run([str(k8s_cluster.bin_dir / "helm"), "template", "kubeinfer", str(CHART), "-f", "-"],
                         input=json.dumps(values), capture_output=True, text=True, check=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(out.stdout)
            if doc and doc["kind"] in ("InferenceModel", "ScaledObject")]


# Queue depth = requests waiting in the engines + requests the gateway holds for want of an engine; at zero
# replicas only the second exists. `or vector(0)`: a sum over no series is empty, not 0.
GATEWAY_QUERY = ('(sum(vllm:num_requests_waiting{namespace="{{ .namespace }}",model_name="{{ .servedName }}"}) '
                 'or vector(0)) + (sum(kubeinfer_gateway_requests_pending{namespace="{{ .namespace }}",'
                 'model_name="{{ .servedName }}"}) or vector(0))')
KEDA_MAX = 2


def test_keda_scales_to_zero_and_back_and_out_on_queue_depth(k8s_cluster, kube: Kube, namespace: str,
                                                             keda: MetricsStack, tmp_path: Path) -> None:
    name = "zero"
    objects = chart_keda_objects(k8s_cluster, namespace, name, keda.prometheus_url, GATEWAY_QUERY, {
        "enabled": True, "minReplicas": 0, "maxReplicas": KEDA_MAX, "targetQueueDepth": TARGET,
        "scaleDown": {"stabilizationWindowSeconds": 10, "podsPerPeriod": KEDA_MAX, "periodSeconds": 5}})
    assert sorted(o["kind"] for o in objects) == ["InferenceModel", "ScaledObject"], objects
    for manifest in objects:
        kube.create(manifest)
    harness = EngineHarness(kube.api, namespace, f"app.kubernetes.io/component=engine,kubeinfer.dev/model={name}",
                            SERVED, keda.sd_file, tmp_path / "engines").start()
    load = LoadGenerator(harness.ready_urls, SERVED, concurrency=8, max_tokens=24)
    keda.scrape_gateway(load.serve_metrics(), {"namespace": namespace})
    timeline = Timeline(kube.get, keda.query, namespace, name, f"keda-hpa-{name}", load).start()

    def autoscaling() -> dict[str, Any]:
        return condition(get_im(kube, namespace, name), "Autoscaling")

    try:
        # Idle: KEDA takes the model to zero after the cooldown, and says so without calling it a failure.
        wait_for(lambda: replicas(kube, namespace, name)[0] == 0, timeout=180, interval=1,
                 what=f"KEDA to scale the idle model to zero\n{keda.log_tail('keda-operator')}")
        wait_for(lambda: not harness.engines, timeout=60, interval=1, what="the engine to stop with its pod")
        wait_for(lambda: autoscaling().get("status") == "True", timeout=60, interval=1,
                 what=f"Autoscaling True at zero: {autoscaling()}")
        assert get_im(kube, namespace, name)["status"]["phase"] == "Pending"  # ScaledToZero: serving nothing

        load.start()  # requests wait at the gateway: KEDA sees them and activates the model
        wait_for(lambda: replicas(kube, namespace, name)[0] >= 1, timeout=90, interval=1,
                 what=f"KEDA to scale from zero; last samples {timeline.samples[-3:]}")
        wait_for(lambda: harness.ready_urls(), timeout=400, interval=1, what="the first engine to answer /ready")
        wait_for(lambda: replicas(kube, namespace, name)[0] == KEDA_MAX, timeout=240, interval=1,
                 what=f"KEDA's HPA to scale to {KEDA_MAX} on the queue; last samples {timeline.samples[-3:]}")
        wait_for(lambda: len(harness.ready_urls()) == KEDA_MAX, timeout=300, interval=1,
                 what=f"{KEDA_MAX} engines ready")
        # KEDA owns the model's replicas (scale subresource); the operator only carries them to the Deployment.
        assert FIELD_MANAGER not in replicas_writers(kube, namespace, name), replicas_writers(kube, namespace, name)
        load.stop()
        wait_for(lambda: replicas(kube, namespace, name)[0] == 0, timeout=240, interval=1,
                 what="the scale-down back to zero")
        timeline.samples.append(timeline.sample())
    finally:
        timeline.stop()
        load.close(wait=10)
        keda.scrape_gateway(0, {})
        harness.stop()
        path = write_timeline(timeline, tmp_path, "keda-timeline")
        print(f"\ntimeline: {path}")

    samples = [s for s in timeline.samples if "error" not in s]
    counts = [s["replicas"] for s in samples]
    first_max = counts.index(KEDA_MAX)
    assert 0 in counts[:first_max] and counts[-1] == 0, counts
    assert max(s["gateway_pending"] for s in samples[:first_max]) > 0, "requests waited at the gateway at zero"
    seen = [quantity(s["hpa_metric"]) for s in samples if s["hpa_metric"] is not None]
    assert seen and max(seen) > TARGET, f"KEDA's HPA saw the queue build up: {seen}"
    hpa = kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, f"keda-hpa-{name}")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "InferenceModel"
    assert hpa["spec"]["metrics"][0]["type"] == "External"
    assert load.stats.ok > 0 and load.stats.failed <= 2 + load.stats.sent // 10, load.stats
    assert harness.started_total >= KEDA_MAX, "every new pod got an engine"
    assert FIELD_MANAGER not in replicas_writers(kube, namespace, name)
