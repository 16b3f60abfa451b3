"""Samples the autoscaling loop once a second: load, queue depth per pod (Prometheus), replicas, what the HPA saw.

Used by the autoscaling tests (assertions + a JSON timeline) and by `make autoscaling-demo` (live
printout + a matplotlib PNG).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Timeline:
    def __init__(self, kube_get: Callable[[str, str, str, str], dict[str, Any] | None], query: Callable[[str], list],
                 namespace: str, deployment: str, hpa: str, load: Any, interval: float = 1.0,
                 on_sample: Callable[[dict[str, Any]], None] | None = None):
        self.kube_get, self.query = kube_get, query
        self.namespace, self.deployment, self.hpa, self.load = namespace, deployment, hpa, load
        self.interval, self.on_sample = interval, on_sample
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def start(self) -> Timeline:
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self.sample()
            except Exception as error:  # a sample is best effort; the next one comes in a second
                sample = {"t": round(time.monotonic() - self._t0, 1), "error": str(error)}
            self.samples.append(sample)
            if self.on_sample is not None:
                self.on_sample(sample)
            self._stop.wait(self.interval)

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        deployment = self.kube_get("apps/v1", "Deployment", self.namespace, self.deployment) or {}
        hpa = self.kube_get("autoscaling/v2", "HorizontalPodAutoscaler", self.namespace, self.hpa) or {}
        queue = {r["metric"].get("pod", "?"): float(r["value"][1])
                 for r in self.query(f'vllm:num_requests_waiting{{namespace="{self.namespace}"}}')}
        running = {r["metric"].get("pod", "?"): float(r["value"][1])
                   for r in self.query(f'vllm:num_requests_running{{namespace="{self.namespace}"}}')}
        stats = self.load.stats
        # The engines' own counter (a rate over 5 s of 1 s scrapes), not the client's completions: those
        # arrive in bursts as whole requests finish.
        generated = self.query(f'sum(rate(vllm:generation_tokens_total{{namespace="{self.namespace}"}}[5s]))')
        tok_s = float(generated[0]["value"][1]) if generated else 0.0
        hpa_status = hpa.get("status") or {}
        metric = None
        for current in hpa_status.get("currentMetrics") or []:
            for source in ("pods", "external"):
                value = ((current.get(source) or {}).get("current") or {})
                metric = value.get("averageValue") or value.get("value") or metric
        return {
            "t": round(now - self._t0, 1),
            "load_workers": self.load.concurrency if self.load.active else 0,
            "in_flight": stats.in_flight,
            "gateway_pending": stats.pending,
            "completed": stats.ok,
            "failed": stats.failed,
            "tok_s": round(tok_s, 1),
            "queue_by_pod": queue,
            "running_by_pod": running,
            "queue_total": sum(queue.values()),
            "replicas": (deployment.get("spec") or {}).get("replicas"),
            "ready_replicas": (deployment.get("status") or {}).get("readyReplicas", 0),
            "hpa_metric": metric,
            "hpa_desired": hpa_status.get("desiredReplicas"),
            "hpa_current": hpa_status.get("currentReplicas"),
        }

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"namespace": self.namespace, "deployment": self.deployment, "hpa": self.hpa,
                                    "samples": self.samples}, indent=1))
        return path


def quantity(value: str | None) -> float | None:
    """A Kubernetes quantity as the HPA writes metric values ("2", "2500m", "1k")."""
    if value is None:
        return None
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    if value[-1] in suffixes:
        return float(value[:-1]) * suffixes[value[-1]]
    return float(value)


def plot(samples: list[dict[str, Any]], path: Path, title: str) -> Path:
    """A PNG of load, queue depth and replicas over time (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in samples if "error" not in s]
    t = [s["t"] for s in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(t, [s["queue_total"] for s in rows], label="waiting requests (all pods)")
    top.plot(t, [quantity(s["hpa_metric"]) or 0 for s in rows], label="HPA's metric (avg per pod)")
    top.plot(t, [s["load_workers"] for s in rows], "--", label="load workers")
    top.set_ylabel("requests")
    top.legend(loc="upper right")
    bottom.step(t, [s["replicas"] or 0 for s in rows], where="post", label="replicas (Deployment)")
    bottom.step(t, [s["ready_replicas"] or 0 for s in rows], where="post", label="ready replicas")
    bottom.plot(t, [s["tok_s"] / 10 for s in rows], alpha=0.5, label="tok/s / 10")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
