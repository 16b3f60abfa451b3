"""Helpers for driving real `kubeinfer serve` processes on 127.0.0.1 (random free ports)."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from kubeinfer.engine.bench.serve import local_serve_command
from kubeinfer.engine.ports import free_port

API_KEY = "test-key"
# Small KV cache and batch: fast to allocate, plenty for these tests.
COMMON_FLAGS = ["--kv-cache-memory", "128MiB", "--max-model-len", "1024", "--log-level", "warning"]


@dataclass
class ServerProcess:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    ready_history: list[tuple[int, int]] = field(default_factory=list)  # (health, ready) while starting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> ServerProcess:
        self.log_path = log_dir / f"server-{self.port}.log"
        command = local_serve_command(self.port, [*COMMON_FLAGS, *self.args])
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        return self

    def probe(self) -> tuple[int, int]:
        try:
            health = httpx.get(f"{self.url}/health", timeout=2).status_code
            ready = httpx.get(f"{self.url}/ready", timeout=2).status_code
        except httpx.TransportError:
            return 0, 0
        return health, ready

    def wait_ready(self, timeout: float = 240) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            state = self.probe()
            self.ready_history.append(state)
            if state == (200, 200):
                return self
            time.sleep(0.1)
        log = self.log()
        self.stop()  # a server that never got ready is not left running
        raise TimeoutError(f"server not ready after {timeout}s:\n{log}")

    def log(self, tail: int | None = 4000) -> str:
        """The server's output; its last `tail` characters unless `tail` is None."""
        text = self.log_path.read_text(errors="replace") if self.log_path else ""
        return text if tail is None else text[-tail:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def scrape(url: str) -> dict[str, float]:
    """`/metrics` as {'name{labels}': value} (labels as printed by prometheus-client)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for key, value in samples.items():
        match = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
        assert match
        if match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + value, True
    if not found:
        raise KeyError(f"{name} {labels} not in /metrics")
    return total


def wait_for(predicate, timeout: float = 30, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


@functools.cache
def bundled_tokenizer():  # type: ignore[no-untyped-def]
    """The bundled model's tokenizer, as the server loads it (converted once, cached on disk)."""
    from kubeinfer.engine.models.bundled import bundled_model_path
    from kubeinfer.engine.models.gguf_loader import _reader, gguf_tokenizer

    path = bundled_model_path()
    return gguf_tokenizer(path, _reader(path))
