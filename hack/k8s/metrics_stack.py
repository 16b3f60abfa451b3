"""The metrics stack of the autoscaling loop, on the test control plane (binaries from build-metrics.sh).

- Prometheus scrapes the engines through a file_sd file that the engine harness (engines.py) keeps:
  kwok pods have no real IPs, so each target is the engine process's 127.0.0.1 port, labelled as
  kubernetes_sd + the usual relabelling would label it (namespace, pod, the pod's labels).
- prometheus-adapter serves custom.metrics.k8s.io with the chart's own rule file
  (charts/kubeinfer/files/prometheus-adapter-rule.yaml, wrapped as its `rules:` exactly as the chart's
  ConfigMap template does), registered as the real APIService v1beta1.custom.metrics.k8s.io.
- KEDA (operator + metrics apiserver) serves external.metrics.k8s.io as v1beta1.external.metrics.k8s.io.

An APIService points at a Service; the aggregator resolves an ExternalName Service to
`<externalName>:<APIService port>`, so `localhost` + the process's port reaches a process on this
machine while the apiserver still checks the serving cert against `<service>.<namespace>.svc`.
The apiserver already runs with the front-proxy (requestheader) CA and client cert (controlplane.py),
which the adapters trust through the kube-system/extension-apiserver-authentication ConfigMap.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import (
    REPO,
    ControlPlane,
    ControlPlaneError,
    _kill_me_with_parent,
    _terminate_group,
    bin_dir,
    free_port,
)

HERE = Path(__file__).resolve().parent
ADAPTER_RULE = REPO / "charts" / "kubeinfer" / "files" / "prometheus-adapter-rule.yaml"
MONITORING = "monitoring"
CUSTOM_METRICS_API = "v1beta1.custom.metrics.k8s.io"
EXTERNAL_METRICS_API = "v1beta1.external.metrics.k8s.io"


def build_metrics_binaries(*groups: str) -> Path:
    """Run build-metrics.sh for the groups (fast when cached)."""
    subprocess.run(["bash", str(HERE / "build-metrics.sh"), *groups], check=True, stdout=sys.stderr)
    return bin_dir()


def adapter_config(metric_name: str = "vllm_num_requests_waiting") -> dict[str, Any]:
    """prometheus-adapter's --config from the chart's rule file, as templates/prometheus-adapter-configmap.yaml
    renders it (the published name set to the operator's KUBEINFER_QUEUE_METRIC_NAME)."""
    rule = yaml.safe_load(ADAPTER_RULE.read_text())
    rule["name"]["as"] = metric_name
    return {"rules": [rule]}


@dataclass
class MetricsStack:
    plane: ControlPlane
    state_dir: Path
    scrape_interval: str = "1s"
    die_with_parent: bool = True
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    prometheus_url: str = ""
    registered: dict[str, tuple[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)

    @property
    def sd_file(self) -> Path:
        """The file_sd targets file the engine harness writes."""
        return self.state_dir / "engines.sd.json"

    @property
    def gateway_sd_file(self) -> Path:
        """The file_sd targets file of what stands in front of the engines (the load generator's gateway)."""
        return self.state_dir / "gateway.sd.json"

    def scrape_gateway(self, port: int, labels: dict[str, str]) -> None:
        """Scrape 127.0.0.1:port as the gateway (job "gateway"); port 0 stops scraping it."""
        groups = [{"targets": [f"127.0.0.1:{port}"], "labels": labels}] if port else []
        tmp = self.gateway_sd_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.gateway_sd_file)

    # ---- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, binary: str, args: list[str], env: dict[str, str] | None = None) -> None:
        path = self.plane.bin_dir / binary
        if not path.exists():
            raise ControlPlaneError(f"{path} is missing: run hack/k8s/build-metrics.sh")
        log = open(self.state_dir / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (owned by the child)
        self.processes[name] = subprocess.Popen(
            [str(path), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_kill_me_with_parent if self.die_with_parent else None,
            cwd=self.state_dir, env={**os.environ, **(env or {})})
        log.close()

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            proc = self.processes.pop(name)
            _terminate_group(proc.pid, proc)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _wait(self, check, timeout: float, what: str, name: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"timed out waiting for {what}:\n{self.log_tail(name)}")
            time.sleep(0.5)

    # ---- Prometheus ------------------------------------------------------------------------

    def start_prometheus(self) -> None:
        for sd_file in (self.sd_file, self.gateway_sd_file):
            if not sd_file.exists():
                sd_file.write_text("[]")
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{
                "job_name": job,
                "scrape_timeout": self.scrape_interval,
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
            } for job, sd_file in (("kubeinfer-engines", self.sd_file), ("gateway", self.gateway_sd_file))],
        }
        path = self.state_dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        self.prometheus_url = f"http://127.0.0.1:{port}"
        self._spawn("prometheus", "prometheus", [
            f"--config.file={path}", f"--storage.tsdb.path={self.state_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=2h", "--log.level=warn"])
        self._wait(lambda: self._http_ok(f"{self.prometheus_url}/-/ready"), 60, "Prometheus /-/ready", "prometheus")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector."""
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    # ---- APIServices -----------------------------------------------------------------------

    def _serving_cert(self, service: str, client_auth: bool = False) -> tuple[Path, Path]:
        import pki

        ca = pki.CertificateAuthority.load(self.plane.state_dir / "pki", issue_into=self.state_dir / "pki")
        return ca.issue(service, service, server_ips=("127.0.0.1",),
                        server_dns=("localhost", f"{service}.{MONITORING}.svc"), client_auth=client_auth)

    def register(self, api_service: str, service: str, port: int) -> None:
        """The APIService and its ExternalName Service (localhost:port), trusted through the test CA."""
        self.registered[api_service] = (service, port)
        version, group = api_service.split(".", 1)
        ca = base64.b64encode((self.plane.state_dir / "pki" / "ca.crt").read_bytes()).decode()
        manifests = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MONITORING}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": service, "namespace": MONITORING},
             "spec": {"type": "ExternalName", "externalName": "localhost",
                      "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}},
            {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": api_service},
             "spec": {"group": group, "version": version, "groupPriorityMinimum": 100, "versionPriority": 100,
                      "caBundle": ca, "service": {"namespace": MONITORING, "name": service, "port": port}}},
        ]
        self.plane.kubectl("apply", "--server-side", "-f", "-",
                           stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))

    def reregister(self, api_service: str) -> None:
        """Put back an APIService that unregister() removed (the process kept running)."""
        self.register(api_service, *self.registered[api_service])

    def unregister(self, api_service: str) -> None:
        self.plane.kubectl("delete", "apiservice", api_service, "--ignore-not-found")

    def _condition_true(self, resource: str, name: str, condition: str) -> bool:
        """Whether the object exists and its status has `condition` True (a new object may have no status yet)."""
        result = self.plane.kubectl("get", resource, name, "-o", "json", check=False)
        status = json.loads(result.stdout).get("status") if result.returncode == 0 else None
        return any(c["type"] == condition and c["status"] == "True" for c in (status or {}).get("conditions") or [])

    def api_service_available(self, api_service: str) -> bool:
        return self._condition_true("apiservice", api_service, "Available")

    # ---- prometheus-adapter ----------------------------------------------------------------

    def start_prometheus_adapter(self, metric_name: str = "vllm_num_requests_waiting",
                                 relist_interval: str = "5s") -> None:
        config = self.state_dir / "prometheus-adapter.yaml"
        config.write_text(yaml.safe_dump(adapter_config(metric_name)))
        cert, key = self._serving_cert("prometheus-adapter")
        kubeconfig = str(self.plane.state_dir / "admin.kubeconfig")
        port = free_port()
        self._spawn("prometheus-adapter", "prometheus-adapter", [
            f"--prometheus-url={self.prometheus_url}/", f"--config={config}",
            f"--metrics-relist-interval={relist_interval}", f"--lister-kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", f"--tls-cert-file={cert}",
            f"--tls-private-key-file={key}", f"--cert-dir={self.state_dir / 'pki'}", "--v=1"])
        self.register(CUSTOM_METRICS_API, "prometheus-adapter", port)
        self._wait(lambda: self.api_service_available(CUSTOM_METRICS_API), 90,
                   f"APIService {CUSTOM_METRICS_API} Available", "prometheus-adapter")

    # ---- KEDA ------------------------------------------------------------------------------

    def start_keda(self, keda_version: str) -> None:
        """KEDA's operator (ScaledObjects -> its HPA; scales 0 <-> 1 itself) and its metrics apiserver
        (external.metrics.k8s.io, registered as v1beta1.external.metrics.k8s.io), as its release
        manifests run them: one namespace for KEDA's objects, mTLS between the two over gRPC with
        certificates in one directory (ca.crt, tls.crt, tls.key; here from the test CA, with
        --enable-cert-rotation off, as with cert-manager), the admission webhooks left out."""
        crds = self.plane.bin_dir / f"keda-crds-{keda_version}"
        self.plane.kubectl("apply", "--server-side", "-f", str(crds))
        self._wait(lambda: self._condition_true("crd", "scaledobjects.keda.sh", "Established"), 60, "KEDA's CRDs Established", "")
        certs = self.state_dir / "keda-certs"
        certs.mkdir(exist_ok=True)
        cert, key = self._serving_cert("keda-metrics-apiserver", client_auth=True)
        for source, name in ((self.plane.state_dir / "pki" / "ca.crt", "ca.crt"), (cert, "tls.crt"), (key, "tls.key")):
            (certs / name).write_bytes(source.read_bytes())
        kubeconfig = str(self.plane.state_dir / "admin.kubeconfig")
        self.plane.kubectl("create", "namespace", MONITORING, check=False)
        env = {"KUBECONFIG": kubeconfig, "WATCH_NAMESPACE": "", "POD_NAMESPACE": MONITORING,
               "KEDA_CLUSTER_OBJECT_NAMESPACE": MONITORING}
        grpc, health = free_port(), free_port()
        self._spawn("keda-operator", "keda-operator", [
            "--leader-elect=false", "--zap-log-level=info", "--zap-encoder=console", "--metrics-bind-address=0",
            f"--health-probe-bind-address=127.0.0.1:{health}", f"--metrics-service-bind-address=127.0.0.1:{grpc}",
            f"--cert-dir={certs}", f"--ca-dir={certs}", "--enable-cert-rotation=false",
            "--enable-webhook-patching=false", "--enable-apiservice-patching=false"], env=env)
        self._wait(lambda: self._http_ok(f"http://127.0.0.1:{health}/readyz"), 90, "keda-operator /readyz",
                   "keda-operator")
        port = free_port()
        self._spawn("keda-adapter", "keda-adapter", [
            f"--secure-port={port}", "--bind-address=127.0.0.1", f"--tls-cert-file={certs / 'tls.crt'}",
            f"--tls-private-key-file={certs / 'tls.key'}", f"--cert-dir={certs}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            f"--lister-kubeconfig={kubeconfig}", f"--metrics-service-address=127.0.0.1:{grpc}",
            "--metrics-service-grpc-authority=localhost", f"--port={free_port()}", "--zap-log-level=info"],
            env=env)
        self.register(EXTERNAL_METRICS_API, "keda-metrics-apiserver", port)
        self._wait(lambda: self.api_service_available(EXTERNAL_METRICS_API), 90,
                   f"APIService {EXTERNAL_METRICS_API} Available", "keda-adapter")
