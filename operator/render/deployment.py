"""The Deployment of engine pods: `kubeinfer serve` with flags, probes, GPUs, volumes and drain."""

from __future__ import annotations

import math
from typing import Any

from kubeinfer.operator.render.common import (
    HTTP_PORT,
    cache_claim_name,
    labels,
    metadata,
    selector_labels,
)
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import InferenceModel, InferenceModelSpec

CONTAINER = "engine"
CACHE_MOUNT = "/cache"
MODELS_MOUNT = "/models"
RUN_AS = 10001  # the uid of the kubeinfer engine images (docker/engine-*.Dockerfile)
STARTUP_PERIOD_SECONDS = 10


def engine_args(spec: InferenceModelSpec) -> list[str]:
    """`kubeinfer serve` flags (named like vLLM's) for this spec; user extraArgs come last."""
    engine = spec.engine
    args = ["--model", model_path(spec), "--served-model-name", spec.served_name,
            "--host", "0.0.0.0", "--port", str(HTTP_PORT),
            "--tensor-parallel-size", str(engine.tensor_parallel_size), "--dtype", engine.dtype]
    optional = {
        "--max-model-len": engine.max_model_len,
        "--max-num-seqs": engine.max_num_seqs,
        "--max-num-batched-tokens": engine.max_num_batched_tokens,
        "--block-size": engine.block_size,
        "--gpu-memory-utilization": engine.gpu_memory_utilization,
        "--quantization": engine.quantization,
        "--kv-cache-dtype": None if engine.kv_cache_dtype == "auto" else engine.kv_cache_dtype,
        "--max-request-body-bytes": engine.max_request_body_bytes,
        "--max-header-bytes": engine.max_header_bytes,
        "--request-timeout": engine.request_timeout_seconds,
        "--tool-call-parser": engine.tool_call_parser,
        "--chat-template": engine.chat_template,
    }
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    args.append("--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching")
    if engine.tool_call_parser:
        args.append("--enable-auto-tool-choice")
    return args + list(engine.extra_args)


DRAIN_MARGIN_SECONDS = 5


def model_path(spec: InferenceModelSpec) -> str:
    """What `--model` gets: the Hub repo id, a path on the mounted claim, or a path in the image."""
    source = spec.model
    if source.hf_repo:
        return source.hf_repo
    if claim_and_path := source.pvc_claim_and_path:
        return f"{MODELS_MOUNT}/{claim_and_path[1]}".rstrip("/")
    return source.file_path or source.source


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def drain_timeout_seconds(spec: InferenceModelSpec) -> int:
    """How long the engine finishes in-flight requests after SIGTERM: the grace period that the
    preStop sleep leaves, less a margin so the kubelet never has to SIGKILL a draining pod."""
    return max(1, spec.termination_grace_period_seconds - spec.pre_stop_sleep_seconds - DRAIN_MARGIN_SECONDS)


def engine_env(spec: InferenceModelSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
        {"name": "KUBEINFER_DRAIN_TIMEOUT", "value": str(drain_timeout_seconds(spec))},
    ]
    if spec.model.revision:
        env.append({"name": "KUBEINFER_REVISION", "value": spec.model.revision})
    if spec.model.token_secret_ref:
        ref = spec.model.token_secret_ref
        env.append(_secret_env("HF_TOKEN", ref.name, ref.key))
    if spec.api_key_secret_ref:
        ref = spec.api_key_secret_ref
        env.append(_secret_env("KUBEINFER_API_KEY", ref.name, ref.key))
    user = [var.model_dump(by_alias=True, exclude_none=True) for var in spec.engine.env]
    overridden = {var["name"] for var in user}
    return [var for var in env if var["name"] not in overridden] + user


def _volumes_and_mounts(im: InferenceModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = im.spec
    cache = spec.model.cache
    if cache is None:
        cache_volume: dict[str, Any] = {"name": "model-cache", "emptyDir": {}}
    else:
        claim = cache.claim_name or cache_claim_name(im)
        cache_volume = {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim}}
    volumes = [cache_volume]
    mounts = [{"name": "model-cache", "mountPath": CACHE_MOUNT}]
    if claim_and_path := spec.model.pvc_claim_and_path:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim_and_path[0], "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    if spec.engine.tensor_parallel_size > 1:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _resources(spec: InferenceModelSpec) -> dict[str, Any]:
    requests = spec.resources.requests.as_dict()
    limits = spec.resources.limits.as_dict()
    if spec.resources.gpus > 0:
        limits[spec.resources.gpu_resource_name] = str(spec.resources.gpus)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def engine_container(im: InferenceModel, settings: OperatorSettings) -> dict[str, Any]:
    spec = im.spec
    _, mounts = _volumes_and_mounts(im)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.image_for(spec.resources.gpus),
        "command": ["kubeinfer", "serve"],
        "args": engine_args(spec),
        "env": engine_env(spec),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        # Model loading takes minutes: the startup probe allows startupTimeoutSeconds before liveness applies.
        "startupProbe": _probe("/health", STARTUP_PERIOD_SECONDS,
                               max(1, math.ceil(spec.startup_timeout_seconds / STARTUP_PERIOD_SECONDS))),
        "readinessProbe": _probe("/ready", 5, 3),
        "livenessProbe": _probe("/health", 10, 6),
        # Endpoints stop routing first; then SIGTERM makes the server drain in-flight requests.
        "lifecycle": {"preStop": {"sleep": {"seconds": spec.pre_stop_sleep_seconds}}},
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if resources := _resources(spec):
        container["resources"] = resources
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def _tolerations(spec: InferenceModelSpec) -> list[dict[str, Any]]:
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.scheduling.tolerations]
    if spec.resources.gpus > 0 and spec.scheduling.tolerate_gpu_taint:
        gpu = {"key": spec.resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}
        if gpu not in tolerations:
            tolerations.append(gpu)
    return tolerations


def pod_annotations(spec: InferenceModelSpec) -> dict[str, str]:
    annotations = dict(spec.pod_template.annotations)
    if spec.monitoring.pod_annotations:
        annotations |= {"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP_PORT),
                        "prometheus.io/path": "/metrics"}
    return annotations


def pod_spec(im: InferenceModel, settings: OperatorSettings) -> dict[str, Any]:
    spec = im.spec
    scheduling = spec.scheduling
    volumes, _ = _volumes_and_mounts(im)
    pod: dict[str, Any] = {
        "containers": [engine_container(im, settings)],
        "volumes": volumes,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        # Service links would inject KUBEINFER_*-looking variables that the engine reads as flags.
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    optional: dict[str, Any] = {
        "nodeSelector": dict(scheduling.node_selector),
        "tolerations": _tolerations(spec),
        "affinity": scheduling.affinity,
        "topologySpreadConstraints": list(scheduling.topology_spread_constraints),
        "priorityClassName": scheduling.priority_class_name,
        "runtimeClassName": scheduling.runtime_class_name,
        "serviceAccountName": spec.pod_template.service_account_name,
        "imagePullSecrets": [ref.model_dump() for ref in spec.image_pull_secrets],
    }
    pod.update({key: value for key, value in optional.items() if value})
    return pod


def render_deployment(im: InferenceModel, settings: OperatorSettings) -> dict[str, Any]:
    spec = im.spec
    template_meta: dict[str, Any] = {"labels": {**spec.pod_template.labels, **labels(im)}}
    if annotations := pod_annotations(spec):
        template_meta["annotations"] = annotations
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(im)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        # A rollout may legitimately take as long as a model load.
        "progressDeadlineSeconds": spec.startup_timeout_seconds + 300,
        "template": {"metadata": template_meta, "spec": pod_spec(im, settings)},
    }
    if not spec.autoscaled:
        # With autoscaling on the HPA owns replicas: leaving the field out of our apply means never fighting it.
        deployment_spec["replicas"] = spec.replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(im), "spec": deployment_spec}
