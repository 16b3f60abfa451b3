"""The InferenceModel spec as pydantic models (camelCase aliases, same defaults as the CRD).

The CRD's OpenAPI schema and CEL rules are what the API server enforces; these models give the
render functions typed access and re-check the same rules, so a unit test or an old API server
without CEL still gets a clear error.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

HF_SOURCE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][-A-Za-z0-9._]*/[A-Za-z0-9][-A-Za-z0-9._]*)$")
PVC_SOURCE = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9.]*[a-z0-9])?)(?P<path>/.*)?$")
FILE_SOURCE = re.compile(r"^file://(?P<path>/.+)$")

Quantity = int | str


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeyRef(CamelModel):
    name: str
    key: str


class TokenSecretRef(SecretKeyRef):
    key: str = "token"


class ApiKeySecretRef(SecretKeyRef):
    key: str = "api-key"


class ModelCache(CamelModel):
    claim_name: str | None = None
    size: Quantity | None = None
    storage_class_name: str | None = None
    access_modes: list[str] = Field(default_factory=lambda: ["ReadWriteOnce"])

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelCache:
        if (self.claim_name is None) == (self.size is None):
            raise ValueError("model.cache needs exactly one of claimName (an existing PVC) or size")
        return self


class ModelSource(CamelModel):
    source: str
    revision: str | None = None
    served_name: str | None = None
    token_secret_ref: TokenSecretRef | None = None
    cache: ModelCache | None = None

    @model_validator(mode="after")
    def _known_scheme(self) -> ModelSource:
        if not (HF_SOURCE.match(self.source) or PVC_SOURCE.match(self.source) or FILE_SOURCE.match(self.source)):
            raise ValueError("model.source must be hf://<org>/<name>, pvc://<claim>/<path> or file:///<path>")
        return self

    @property
    def scheme(self) -> Literal["hf", "pvc", "file"]:
        return self.source.split("://", 1)[0]  # type: ignore[return-value]

    @property
    def hf_repo(self) -> str | None:
        match = HF_SOURCE.match(self.source)
        return match["repo"] if match else None

    @property
    def pvc_claim_and_path(self) -> tuple[str, str] | None:
        """(claim, path inside the claim without the leading slash) for pvc:// sources."""
        match = PVC_SOURCE.match(self.source)
        return (match["claim"], (match["path"] or "/").lstrip("/")) if match else None

    @property
    def file_path(self) -> str | None:
        match = FILE_SOURCE.match(self.source)
        return match["path"] if match else None


class EnvVar(CamelModel):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)
    name: str
    value: str | None = None
    value_from: dict[str, Any] | None = None


class EngineSpec(CamelModel):
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    enable_prefix_caching: bool = True
    quantization: Literal["gguf", "int8", "awq", "gptq", "fp8", "none"] | None = None
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_request_body_bytes: Quantity | None = None
    max_header_bytes: Quantity | None = None
    request_timeout_seconds: float | None = Field(None, ge=0)
    tool_call_parser: Literal["hermes", "qwen", "llama3_json", "mistral"] | None = None
    chat_template: str | None = None
    extra_args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)


class ResourceQuantities(CamelModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    cpu: Quantity | None = None
    memory: Quantity | None = None
    ephemeral_storage: Quantity | None = Field(None, alias="ephemeral-storage")

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.model_dump(by_alias=True, exclude_none=True).items()}


class Resources(CamelModel):
    gpus: int = Field(1, ge=0)
    gpu_resource_name: str = "nvidia.com/gpu"
    requests: ResourceQuantities = Field(default_factory=ResourceQuantities)
    limits: ResourceQuantities = Field(default_factory=ResourceQuantities)


class Toleration(CamelModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Scheduling(CamelModel):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerate_gpu_taint: bool = True
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    priority_class_name: str | None = None
    runtime_class_name: str | None = None


class ScalingRule(CamelModel):
    """One direction of the HPA's `behavior`: how far one evaluation may move the replica count."""

    stabilization_window_seconds: int
    pods_per_period: int | None = Field(None, ge=1)
    percent_per_period: int | None = Field(None, ge=1)
    period_seconds: int = 60


class ScaleUp(ScalingRule):
    """Default: no step limit below maxReplicas (pods_per_period None renders as maxReplicas), so one
    evaluation jumps straight to the count the queue asks for instead of adding a pod per period."""

    stabilization_window_seconds: int = 0
    period_seconds: int = 15


class ScaleDown(ScalingRule):
    """Default: one pod per minute after five quiet minutes (a draining engine loses its KV cache)."""

    stabilization_window_seconds: int = 300
    pods_per_period: int | None = Field(1, ge=1)


class Autoscaling(CamelModel):
    enabled: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_queue_depth: int = Field(5, ge=1)
    scale_up: ScaleUp = Field(default_factory=ScaleUp)
    scale_down: ScaleDown = Field(default_factory=ScaleDown)

    @model_validator(mode="after")
    def _min_le_max(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
        if self.enabled and self.min_replicas < 1:
            raise ValueError("autoscaling.minReplicas: 0 needs the chart's KEDA mode "
                             "(a HorizontalPodAutoscaler cannot scale to zero)")
        return self


class LocalObjectReference(CamelModel):
    name: str


class PodTemplate(CamelModel):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    service_account_name: str | None = None


class ServiceSpec(CamelModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)


class ServiceMonitorSpec(CamelModel):
    enabled: bool = False
    interval: str = "30s"
    labels: dict[str, str] = Field(default_factory=dict)


class Monitoring(CamelModel):
    pod_annotations: bool = True
    service_monitor: ServiceMonitorSpec = Field(default_factory=ServiceMonitorSpec)


class InferenceModelSpec(CamelModel):
    model: ModelSource
    engine: EngineSpec = Field(default_factory=EngineSpec)
    resources: Resources = Field(default_factory=Resources)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    replicas: int = Field(1, ge=0)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    api_key_secret_ref: ApiKeySecretRef | None = None
    pod_template: PodTemplate = Field(default_factory=PodTemplate)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    startup_timeout_seconds: int = Field(1800, ge=30)
    termination_grace_period_seconds: int = Field(120, ge=1)
    pre_stop_sleep_seconds: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _cross_field(self) -> InferenceModelSpec:
        if self.resources.gpus and self.resources.gpus < self.engine.tensor_parallel_size:
            raise ValueError("resources.gpus (GPUs per replica) must be at least engine.tensorParallelSize")
        if self.termination_grace_period_seconds <= self.pre_stop_sleep_seconds:
            raise ValueError("terminationGracePeriodSeconds must be greater than preStopSleepSeconds")
        return self

    @property
    def served_name(self) -> str:
        """The name clients request: servedName, else `org/name` for hf:// (as vLLM), else the last path segment."""
        if self.model.served_name:
            return self.model.served_name
        return self.model.hf_repo or self.model.source.rstrip("/").rsplit("/", 1)[-1]

    @property
    def autoscaled(self) -> bool:
        return self.autoscaling.enabled


class InferenceModel(BaseModel):
    """What the render functions need of the custom resource: identity plus the parsed spec."""

    name: str
    namespace: str
    uid: str
    generation: int = 1
    spec: InferenceModelSpec

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> InferenceModel:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid", ""),
            generation=meta.get("generation", 1),
            spec=InferenceModelSpec.model_validate(body.get("spec") or {}),
        )
