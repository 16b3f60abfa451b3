"""Pure helpers of the kind end-to-end test: what to run and how to read what comes back.

Kept free of side effects (the runner and clock are parameters) so tests/delivery unit-tests them
on machines without Docker.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def _run_quietly(command: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=60)


def missing_prerequisite(which: Callable[[str], str | None] = shutil.which,
                         run: Runner = _run_quietly) -> str | None:
    """Why the e2e test cannot run here (None: it can). Docker first: it is what is usually missing."""
    if which("docker") is None:
        return "no Docker engine: the docker CLI is not installed (the kind e2e test needs Docker)"
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"])
    if info.returncode != 0:
        return f"no Docker engine reachable (`docker info` failed: {info.stderr.strip()[:200]})"
    for tool in ("kind", "kubectl", "helm"):
        if which(tool) is None:
            return f"{tool} is not on PATH (the kind e2e test needs kind, kubectl and helm)"
    return None


@dataclass(frozen=True)
class Images:
    """The images the e2e test builds and loads into kind (hack/images.sh naming)."""

    prefix: str = "ghcr.io/kubeinfer"
    tag: str = "e2e"

    @property
    def operator(self) -> str:
        return f"{self.prefix}/operator:{self.tag}"

    @property
    def engine_cpu(self) -> str:
        return f"{self.prefix}/engine:{self.tag}-cpu"

    def build_command(self) -> list[str]:
        return ["env", f"IMAGE_PREFIX={self.prefix}", f"TAG={self.tag}", "IMAGES=engine-cpu operator",
                "bash", str(REPO / "hack" / "images.sh")]


def kind_create_command(cluster: str, kubeconfig: Path, wait: str = "180s") -> list[str]:
    return ["kind", "create", "cluster", "--name", cluster, "--kubeconfig", str(kubeconfig), "--wait", wait]


def kind_load_command(cluster: str, image: str) -> list[str]:
    return ["kind", "load", "docker-image", image, "--name", cluster]


def kind_delete_command(cluster: str) -> list[str]:
    return ["kind", "delete", "cluster", "--name", cluster]


def helm_install_command(kubeconfig: Path, images: Images, release: str = "kubeinfer",
                         namespace: str = "kubeinfer-system") -> list[str]:
    """Install the chart with the freshly built images (loaded into kind, so never pulled)."""
    def split(ref: str) -> tuple[str, str]:
        repository, _, tag = ref.rpartition(":")
        return repository, tag

    operator_repo, operator_tag = split(images.operator)
    cpu_repo, cpu_tag = split(images.engine_cpu)
    values = {
        "operator.image.repository": operator_repo, "operator.image.tag": operator_tag,
        "operator.image.pullPolicy": "Never",
        "engine.cpuImage.repository": cpu_repo, "engine.cpuImage.tag": cpu_tag,
    }
    command = ["helm", "install", release, str(REPO / "charts" / "kubeinfer"), "--kubeconfig", str(kubeconfig),
               "--namespace", namespace, "--create-namespace", "--wait", "--timeout", "5m"]
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    return command


FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


def forwarded_port(line: str) -> int | None:
    """The local port in a `kubectl port-forward` line, e.g. 'Forwarding from 127.0.0.1:41234 -> 8000'."""
    match = FORWARDING.search(line)
    return int(match.group(1)) if match else None


def condition_true(obj: dict[str, Any], condition_type: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == condition_type and c.get("status") == "True" for c in conditions)


def is_ready(model: dict[str, Any], replicas: int = 1) -> bool:
    """The operator saw the latest spec, says Ready, and at least `replicas` pods are ready."""
    status = model.get("status") or {}
    generation = (model.get("metadata") or {}).get("generation")
    if generation is not None and status.get("observedGeneration") != generation:
        return False
    return condition_true(model, "Ready") and (status.get("readyReplicas") or 0) >= replicas


def wait_until(check: Callable[[], T], timeout: float, interval: float = 2.0, what: str = "condition",
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """Poll `check` until it returns something truthy; raise TimeoutError with the last value."""
    deadline = clock() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if clock() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        sleep(interval)
