"""Prometheus metrics with vLLM's names (the model-server protocol gateways and autoscalers read).

Gauges and engine counters are read live at scrape time by a custom collector from the
async engine's snapshot, so `vllm:num_requests_waiting` is exact at any instant. Per-request
histograms are observed when a request finishes. Every series carries `model_name`. Each app
gets its own `CollectorRegistry`, so several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

disable_created_metrics()

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
TPOT_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
REQUEST_LATENCY_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class EngineSnapshot:
    """A consistent point-in-time view of the engine (waiting already includes queued submissions)."""

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0
    num_gpu_blocks: int = 0
    block_size: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    enable_prefix_caching: bool = False
    cache_dtype: str = "auto"  # --kv-cache-dtype as given (vLLM's label value)
    quantization: str = "none"  # how the weights are kept (engine/layers/quantization.py)
    weight_types: str = ""  # the quantized formats held, e.g. "Q4_1/Q8_0"
    weight_bytes: int = 0  # resident weight bytes (dense + quantized)


class _EngineStateCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot | None], model_name: Callable[[], str | None]):
        self._snapshot = snapshot
        self._model_name = model_name

    def describe(self) -> list[Metric]:
        return []  # collected lazily; no fixed description before the model is loaded

    def collect(self) -> Iterator[Metric]:
        snap, name = self._snapshot(), self._model_name()
        if snap is None or name is None:
            return
        labels = ["model_name"]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=labels)
            family.add_metric([name], value)
            return family

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, doc, labels=labels)
            family.add_metric([name], value)
            return family

        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", snap.num_waiting
        )
        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", snap.num_running
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", snap.kv_cache_usage
        )
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig.",
            labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"],
        )
        info.add_metric(
            [name, str(snap.block_size), str(snap.num_gpu_blocks), str(snap.enable_prefix_caching), snap.cache_dtype],
            1.0,
        )
        yield info
        weights = GaugeMetricFamily(
            "kubeinfer:model_weights_info",
            "How the model's weights are kept (value: resident weight bytes).",
            labels=["model_name", "quantization", "weight_types"],
        )
        weights.add_metric([name, snap.quantization, snap.weight_types], float(snap.weight_bytes))
        yield weights
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", snap.num_preemptions_total)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", snap.prompt_tokens_total)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", snap.generation_tokens_total
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            snap.prefix_cache_queries_total,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            snap.prefix_cache_hits_total,
        )


class ServingMetrics:
    """All of one server's collectors, in a registry of its own."""

    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot | None],
        model_name: Callable[[], str | None],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc., as vLLM's default registry has
        self._model_name = model_name
        label = ["model_name"]
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            label,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            label,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            label,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.request_time_per_output_token = Histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            label,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            label,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            label,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*label, "finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_EngineStateCollector(snapshot, model_name))

    def observe_first_token(self, ttft_s: float) -> None:
        self.time_to_first_token.labels(self._name()).observe(ttft_s)

    def observe_token_interval(self, seconds_per_token: float, num_tokens: int) -> None:
        """Each token after the first: the old name (`time_per_output_token`) and vLLM's current one."""
        name = self._name()
        old, new = self.time_per_output_token.labels(name), self.inter_token_latency.labels(name)
        for _ in range(num_tokens):
            old.observe(seconds_per_token)
            new.observe(seconds_per_token)

    def observe_finished(
        self, finish_reason: str, e2e_s: float, queue_s: float | None, decode_s_per_token: float | None = None
    ) -> None:
        """One finished request; `decode_s_per_token` is its (last - first token time) / (tokens - 1),
        None when it made fewer than two tokens (vLLM observes nothing then either)."""
        name = self._name()
        self.e2e_request_latency.labels(name).observe(e2e_s)
        if decode_s_per_token is not None:
            self.request_time_per_output_token.labels(name).observe(decode_s_per_token)
        if queue_s is not None:
            self.request_queue_time.labels(name).observe(max(queue_s, 0.0))
        self.request_success.labels(name, finish_reason).inc()

    def _name(self) -> str:
        return self._model_name() or "unknown"
