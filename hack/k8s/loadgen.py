"""A bounded, loopback-only load generator for the autoscaling loop (tests and `make autoscaling-demo`).

`concurrency` closed-loop workers each keep one completion in flight, spread over the engines that
are Ready right now (round robin, as a Service would), until stop(). With fewer decode slots than
workers (`--max-num-seqs`), the rest wait: that is the `vllm:num_requests_waiting` the HPA scales on.

With no Ready engine (a model scaled to zero) a worker holds its request until one is, as a gateway
in front of a scaled-to-zero model does (KubeAI's proxy, Knative's activator, Envoy's pending
requests). `serve_metrics()` exports that count as `kubeinfer_gateway_requests_pending{model_name}`:
at zero replicas no engine reports a queue, so this is the signal that scales the model back up.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    in_flight: int = 0
    pending: int = 0  # workers holding a request while no engine is Ready
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class LoadGenerator:
    def __init__(self, engines: Callable[[], list[str]], model: str, concurrency: int = 8, max_tokens: int = 96,
                 prompt: str = "Write a long story about a lighthouse keeper.", timeout: float = 300.0):
        self.engines, self.model = engines, model
        self.concurrency, self.max_tokens, self.prompt, self.timeout = concurrency, max_tokens, prompt, timeout
        self.stats = LoadStats()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next = itertools.count()
        self.active = False  # between start() and stop(): what the timeline plots as load
        self._metrics_server: Any = None

    def start(self) -> LoadGenerator:
        self._stop.clear()
        self.active = True
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._worker, name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, wait: float = 60.0) -> None:
        """No new requests; wait up to `wait` s for the ones in flight."""
        self._stop.set()
        self.active = False
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def serve_metrics(self) -> int:
        """Serve the gateway's /metrics on a free loopback port (for the whole process); returns the port."""
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        registry = CollectorRegistry()
        Gauge("kubeinfer_gateway_requests_pending", "Requests held because no engine of the model is Ready.",
              ["model_name"], registry=registry).labels(self.model).set_function(lambda: self.stats.pending)
        self._metrics_server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        return self._metrics_server.server_port

    def close(self, wait: float = 60.0) -> None:
        """stop(), and stop serving /metrics."""
        self.stop(wait)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def _worker(self) -> None:
        with httpx.Client(timeout=self.timeout) as http:
            while not self._stop.is_set():
                urls = self._wait_for_engines()
                if not urls:
                    continue
                url = urls[next(self._next) % len(urls)]
                if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
                    raise ValueError(f"the load generator only talks to loopback, not {url}")
                with self.stats.lock:
                    self.stats.sent += 1
                    self.stats.in_flight += 1
                try:
                    response = http.post(f"{url}/v1/completions", json={
                        "model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                        "temperature": 0, "ignore_eos": True})
                    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
                    ok = response.status_code == 200
                except (httpx.HTTPError, ValueError, KeyError):
                    ok, tokens = False, 0
                with self.stats.lock:
                    self.stats.in_flight -= 1
                    self.stats.ok += ok
                    self.stats.failed += not ok
                    self.stats.tokens += tokens
                if not ok:
                    self._stop.wait(0.2)  # an engine going away: do not spin

    def _wait_for_engines(self) -> list[str]:
        """The Ready engines; with none, hold the request (counted as pending) until one is or stop()."""
        urls = self.engines()
        if urls:
            return urls
        with self.stats.lock:
            self.stats.pending += 1
        try:
            while not urls and not self._stop.wait(0.2):
                urls = self.engines()
        finally:
            with self.stats.lock:
                self.stats.pending -= 1
        return urls
