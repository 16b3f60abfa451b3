"""Real engines behind kwok's fake pods: a STAND-IN FOR KUBELET + CNI, for tests and `make autoscaling-demo`.

kwok makes pods Running without running anything. This harness watches (polls) the pods of one
InferenceModel and, for every Running pod, runs one real `kubeinfer serve` process on 127.0.0.1
(the bundled SmolLM2 on the CPU, a small KV budget); it stops the process when the pod is deleted.
Like a kubelet with a readiness probe on /ready, it keeps the pod's Ready condition equal to the
process's /ready (kwok marks pods Ready at once; the harness patches the status back to not Ready
until the engine answers, as far as kwok lets it: kwok does not touch a Running pod's conditions).

Like a CNI + kubernetes_sd, it publishes each process to Prometheus: a file_sd file with the
process's address and the labels a real scrape config gives a pod (`namespace`, `pod`, and every
pod label, sanitised as `labelmap` of `__meta_kubernetes_pod_label_(.+)` would). file_sd rather than
kubernetes_sd against the test apiserver: kwok's pod IPs are fake, so a kubernetes_sd relabel would
still need this process's pod->port map, and file_sd keeps the cloud/Kubernetes SD code out of the
Prometheus build (-tags remove_all_sd).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import _kill_me_with_parent, free_port

# Small enough that three engines fit on two cores; --max-num-seqs small so that a queue builds.
DEFAULT_SERVE_ARGS = ("--kv-cache-memory", "64MiB", "--max-model-len", "512", "--max-num-seqs", "2",
                      "--log-level", "warning", "--disable-log-requests")

PROBE_TIMEOUT_SECONDS = 3.0
PROBE_FAILURE_THRESHOLD = 3


def prometheus_label(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


@dataclass
class Engine:
    pod: str
    port: int
    process: subprocess.Popen
    labels: dict[str, str]
    ready: bool = False
    failures: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class EngineHarness:
    """One `kubeinfer serve` per Running pod of `selector` in `namespace` (see the module docstring)."""

    def __init__(self, api_client: Any, namespace: str, selector: str, served_name: str, sd_file: Path,
                 log_dir: Path, serve_args: tuple[str, ...] = DEFAULT_SERVE_ARGS, threads_per_engine: int = 1,
                 poll_seconds: float = 0.5, grace_seconds: float = 120.0):
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.namespace, self.selector, self.served_name = namespace, selector, served_name
        self.sd_file, self.log_dir = sd_file, log_dir
        self.serve_args, self.threads = serve_args, threads_per_engine
        self.poll_seconds = poll_seconds
        self.engines: dict[str, Engine] = {}
        self.terminating: list[tuple[subprocess.Popen, float]] = []
        self.grace_seconds = grace_seconds
        self.started_total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=PROBE_TIMEOUT_SECONDS)
        log_dir.mkdir(parents=True, exist_ok=True)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> EngineHarness:
        self._write_sd()
        self._thread = threading.Thread(target=self._run, name="engine-harness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for name in list(self.engines):
                self._stop_engine(name)
            deadline = time.monotonic() + 15
            while self.terminating and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.2)
            self._reap(force=True)
        self._write_sd()
        self._http.close()

    def ready_urls(self) -> list[str]:
        """What a Service would route to: the engines whose pods are Ready."""
        with self._lock:
            return [engine.url for engine in self.engines.values() if engine.ready]

    # ---- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as error:  # the apiserver restarting, a pod gone mid-patch: try again
                print(f"engine harness: {error}", file=sys.stderr)
            self._stop.wait(self.poll_seconds)

    def _sync(self) -> None:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        running = {p.metadata.name: p for p in pods
                   if p.status.phase == "Running" and p.metadata.deletion_timestamp is None}
        with self._lock:
            self._reap()
            for name in list(self.engines):
                if name not in running:
                    self._stop_engine(name)  # the pod was deleted: the kubelet would stop its container
            for name, pod in running.items():
                if name not in self.engines:
                    self._start_engine(name, pod.metadata.labels or {})
            changed = False
            for name, engine in self.engines.items():
                ready = self._probe(engine)
                changed |= ready != engine.ready
                engine.ready = ready
                self._sync_pod_ready(running[name], ready)
            if changed or set(self.engines) != self._sd_pods():
                self._write_sd()

    def _probe(self, engine: Engine) -> bool:
        """A kubelet readiness probe on /ready: timeoutSeconds 3, failureThreshold 3 (a busy engine on
        two loaded cores may answer late once without being taken out of the Service)."""
        if engine.process.poll() is not None:
            return False
        try:
            ok = self._http.get(f"{engine.url}/ready").status_code == 200
        except httpx.HTTPError:
            ok = False
        engine.failures = 0 if ok else engine.failures + 1
        return ok or (engine.ready and engine.failures < PROBE_FAILURE_THRESHOLD)

    def _sync_pod_ready(self, pod: Any, ready: bool) -> None:
        want = "True" if ready else "False"
        current = {c.type: c.status for c in pod.status.conditions or []}
        if current.get("Ready") == want and current.get("ContainersReady") == want:
            return
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = [{"type": kind, "status": want, "lastTransitionTime": now,
                       "reason": None if ready else "EngineNotReady"} for kind in ("Ready", "ContainersReady")]
        statuses = [{"name": c.name, "ready": ready, "image": c.image, "imageID": c.image_id or "",
                     "restartCount": c.restart_count or 0, "started": True}
                    for c in pod.status.container_statuses or []]
        body: dict[str, Any] = {"status": {"conditions": conditions}}
        if statuses:
            body["status"]["containerStatuses"] = statuses
        with contextlib.suppress(Exception):  # the pod may be going away right now
            self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace, body,
                                                  _content_type="application/strategic-merge-patch+json")

    # ---- processes -------------------------------------------------------------------------

    def _start_engine(self, pod: str, labels: dict[str, str]) -> None:
        port = free_port()
        log = open(self.log_dir / f"{pod}.log", "wb")  # noqa: SIM115 (owned by the child)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        process = subprocess.Popen(
            [sys.executable, "-m", "kubeinfer.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--served-model-name", self.served_name, *self.serve_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.log_dir,  # not the repo root: operator/ there would shadow the stdlib's operator
            start_new_session=True, preexec_fn=_kill_me_with_parent)
        log.close()
        self.engines[pod] = Engine(pod, port, process, labels)
        self.started_total += 1

    def _stop_engine(self, pod: str) -> None:
        """SIGTERM (the engine drains its requests), SIGKILL after the pod's grace period; reaped by _reap."""
        engine = self.engines.pop(pod)
        if engine.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.process.pid, signal.SIGTERM)
            self.terminating.append((engine.process, time.monotonic() + self.grace_seconds))

    def _reap(self, force: bool = False) -> None:
        still = []
        for process, deadline in self.terminating:
            if process.poll() is not None:
                continue
            if force or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                continue
            still.append((process, deadline))
        self.terminating = still

    # ---- service discovery -----------------------------------------------------------------

    def _sd_pods(self) -> set[str]:
        try:
            return {group["labels"]["pod"] for group in json.loads(self.sd_file.read_text())}
        except (OSError, ValueError, KeyError):
            return set()

    def _write_sd(self) -> None:
        groups = []
        for engine in self.engines.values():
            labels = {f"{prometheus_label(k)}": v for k, v in engine.labels.items()}
            labels |= {"namespace": self.namespace, "pod": engine.pod}
            groups.append({"targets": [f"127.0.0.1:{engine.port}"], "labels": labels})
        tmp = self.sd_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        tmp.replace(self.sd_file)  # atomic: Prometheus never reads half a file
