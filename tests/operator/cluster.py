"""Helpers for the tests against the real control plane: clients, waiting, the operator process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from kubeinfer.engine.ports import free_port
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

REPO = Path(__file__).parents[2]
CRD_FILE = REPO / "crds" / "inferencemodels.kubeinfer.dev.yaml"
PERMISSIONS = REPO / "operator" / "PERMISSIONS.md"
T = TypeVar("T")


def kubeconfig_of(cluster: Any) -> str:
    """The admin kubeconfig path of the CONTROLPLANE fixture's cluster."""
    for attribute in ("kubeconfig", "kubeconfig_path"):
        if hasattr(cluster, attribute):
            return str(getattr(cluster, attribute))
    return str(cluster)


def wait_for(check: Callable[[], T], timeout: float = 30, interval: float = 0.5, what: str = "condition") -> T:
    """Poll until `check()` is truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except ApiException as error:
            last = f"ApiException {error.status}: {error.reason}"
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


def permission_rules(section: str) -> list[dict[str, Any]]:
    """The YAML rules block of operator/PERMISSIONS.md that starts with `# <section>`."""
    blocks = re.findall(r"```yaml\n(.*?)```", PERMISSIONS.read_text(), flags=re.S)
    for block in blocks:
        if block.startswith(f"# {section}\n"):
            return yaml.safe_load(block)
    raise KeyError(section)


class Kube:
    """Admin access for the tests (the operator itself runs with its own, narrower identity)."""

    def __init__(self, kubeconfig: str):
        self.kubeconfig = kubeconfig
        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.dynamic = DynamicClient(self.api)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    def resource(self, api_version: str, kind: str):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return self.resource(api_version, kind).get(namespace=namespace, label_selector=selector).to_dict()["items"]

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        resource = self.resource(manifest["apiVersion"], manifest["kind"])
        return resource.create(body=manifest, namespace=manifest["metadata"].get("namespace")).to_dict()

    def apply(self, manifest: dict[str, Any], manager: str = "tests") -> dict[str, Any]:
        resource = self.resource(manifest["apiVersion"], manifest["kind"])
        return self.dynamic.server_side_apply(resource, body=manifest, field_manager=manager,
                                              force_conflicts=True).to_dict()

    def patch(self, api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.resource(api_version, kind).patch(body=body, name=name, namespace=namespace,
                                                      content_type="application/merge-patch+json").to_dict()

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace)
        except ApiException as error:
            if error.status != 404:
                raise

    def kubectl(self, *args: str) -> str:
        result = subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> str:
        """A kubeconfig that authenticates as a service account (a TokenRequest token), like a pod."""
        token = self.core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"expirationSeconds": 7200}}).status.token
        admin = yaml.safe_load(Path(self.kubeconfig).read_text())
        current = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
        cluster = next(c for c in admin["clusters"] if c["name"] == current["cluster"])
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "operator",
            "clusters": [cluster],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": "operator"}}],
        }))
        return str(path)

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [e for e in self.list("v1", "Event", namespace)
                if e["involvedObject"].get("kind") == "InferenceModel" and e["involvedObject"]["name"] == name]


class OperatorProcess:
    """`kubeinfer operator` as a subprocess, exactly as a pod would run it (env settings, leader election)."""

    def __init__(self, kubeconfig: str, log_path: Path, lease_namespace: str, resync_seconds: float = 3,
                 identity: str = "operator-1"):
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.liveness_port = free_port()
        self.env = {**os.environ, "KUBECONFIG": kubeconfig, "KUBEINFER_LOG_FORMAT": "json",
                    "KUBEINFER_RESYNC_SECONDS": str(resync_seconds), "KUBEINFER_LIVENESS_PORT": str(self.liveness_port),
                    "KUBEINFER_LEASE_NAMESPACE": lease_namespace, "KUBEINFER_LEASE_DURATION_SECONDS": "6",
                    "KUBEINFER_LEASE_RENEW_SECONDS": "2", "KUBEINFER_ENGINE_IMAGE": "kubeinfer/engine:test",
                    "KUBEINFER_OPERATOR_NAMESPACES": "", "KUBEINFER_IDENTITY": identity}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "kubeinfer.cli", "operator"], env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_alive()

    def alive(self) -> bool:
        """/healthz answers 200: from the standby server while waiting for the lease, then from kopf."""
        assert self.process is not None and self.process.poll() is None, f"operator exited:\n{self.tail()}"
        try:
            return httpx.get(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_alive(self, timeout: float = 60) -> None:
        wait_for(self.alive, timeout=timeout, what="the operator's liveness endpoint")

    def adopt(self, other: OperatorProcess) -> None:
        """Become `other` (the session fixture then stops the process that is running now)."""
        self.process, self._log, self.log_path = other.process, other._log, other.log_path
        self.liveness_port, self.env = other.liveness_port, other.env

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
