"""Operator settings, read from `KUBEINFER_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubeinfer import __version__

SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _own_namespace() -> str:
    """Where the operator pod runs (for its Lease): POD_NAMESPACE, the service account's, else default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SERVICEACCOUNT_NAMESPACE.exists():
        return SERVICEACCOUNT_NAMESPACE.read_text().strip()
    return "default"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBEINFER_", extra="ignore")

    operator_namespaces: str = Field("", description="comma-separated namespaces to watch; empty = cluster-wide")
    engine_image: str = f"ghcr.io/kubeinfer/engine:{__version__}"
    engine_cpu_image: str = Field("", description="image for InferenceModels with resources.gpus: 0; empty = engine_image")
    queue_metric_name: str = Field(
        "vllm_num_requests_waiting",
        description="Pods metric the HPA reads; the chart's prometheus-adapter rule exposes vllm:num_requests_waiting under this name",
    )
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    resync_seconds: float = Field(60.0, gt=0, description="period of the full reconcile that corrects drift")
    reference_recheck_seconds: float = Field(
        2.0, gt=0, description="a model waiting for a Secret or PVC it references is reconciled again this often")
    liveness_port: int = Field(8080, ge=0, le=65535, description="GET /healthz on this port; 0 disables it")
    leader_election: bool = True
    lease_name: str = "kubeinfer-operator"
    lease_namespace: str = Field(default_factory=_own_namespace)
    lease_duration_seconds: int = Field(15, ge=2)
    lease_renew_seconds: int = Field(5, ge=1)
    identity: str = Field(default_factory=lambda: os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}")

    @property
    def namespaces(self) -> list[str]:
        return [ns.strip() for ns in self.operator_namespaces.split(",") if ns.strip()]

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def image_for(self, gpus: int) -> str:
        return self.engine_cpu_image if gpus == 0 and self.engine_cpu_image else self.engine_image
