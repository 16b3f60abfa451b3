"""Pure render functions: exact manifests, no cluster."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.render import render_children
from kubeinfer.operator.render.deployment import engine_args, render_deployment
from kubeinfer.operator.render.hpa import render_hpa
from kubeinfer.operator.render.pdb import render_pdb
from kubeinfer.operator.render.pvc import render_cache_pvc
from kubeinfer.operator.render.service import render_service
from kubeinfer.operator.render.servicemonitor import render_service_monitor
from kubeinfer.operator.settings import OperatorSettings

from tests.operator.factories import make_model

LABELS = {
    "app.kubernetes.io/name": "kubeinfer",
    "app.kubernetes.io/instance": "llama",
    "app.kubernetes.io/component": "engine",
    "app.kubernetes.io/managed-by": "kubeinfer-operator",
    "kubeinfer.dev/model": "llama",
}
SELECTOR = {"app.kubernetes.io/component": "engine", "kubeinfer.dev/model": "llama"}
OWNER = {"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel", "name": "llama", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}
META = {"name": "llama", "namespace": "ai", "labels": LABELS, "ownerReferences": [OWNER]}
HF = {"source": "hf://meta-llama/Llama-3.1-8B-Instruct"}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_deployment_exact(settings: OperatorSettings) -> None:
    im = make_model({"model": {**HF, "tokenSecretRef": {"name": "hf"}, "cache": {"size": "100Gi"}},
                     "engine": {"maxModelLen": 8192, "tensorParallelSize": 2}, "resources": {"gpus": 2},
                     "apiKeySecretRef": {"name": "keys"}, "replicas": 2})
    probe = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    assert render_deployment(im, settings) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": META,
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": SELECTOR},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": 2100,
            "template": {
                "metadata": {"labels": LABELS, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}},
                "spec": {
                    "containers": [{
                        "name": "engine",
                        "image": "registry.example/engine:1",
                        "command": ["kubeinfer", "serve"],
                        "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct",
                                 "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct",
                                 "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "2",
                                 "--dtype", "auto", "--max-model-len", "8192", "--enable-prefix-caching"],
                        "env": [
                            {"name": "HF_HOME", "value": "/cache/huggingface"},
                            {"name": "KUBEINFER_DRAIN_TIMEOUT", "value": "110"},
                            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                            {"name": "KUBEINFER_API_KEY",
                             "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}},
                        ],
                        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 180},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "timeoutSeconds": 5,
                                           "periodSeconds": 5, "failureThreshold": 3},
                        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
                        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                        "volumeMounts": [{"name": "model-cache", "mountPath": "/cache"},
                                         {"name": "dshm", "mountPath": "/dev/shm"}],
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                        "resources": {"limits": {"nvidia.com/gpu": "2"}},
                    }],
                    "volumes": [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "llama-model-cache"}},
                                {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                    "terminationGracePeriodSeconds": 120,
                    "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
        },
    }


def test_autoscaled_deployment_leaves_replicas_to_the_hpa(settings: OperatorSettings) -> None:
    im = make_model({"model": HF, "replicas": 3, "autoscaling": {"enabled": True}})
    assert "replicas" not in render_deployment(im, settings)["spec"]
    assert render_deployment(make_model({"model": HF, "replicas": 3}), settings)["spec"]["replicas"] == 3


def test_pvc_source_mounts_the_claim_read_only(settings: OperatorSettings) -> None:
    deployment = render_deployment(make_model({"model": {"source": "pvc://weights/llama/8b"}}), settings)
    pod = deployment["spec"]["template"]["spec"]
    assert container(deployment)["args"][:2] == ["--model", "/models/llama/8b"]
    assert container(deployment)["args"][2:4] == ["--served-model-name", "8b"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container(deployment)["volumeMounts"]
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]


def test_file_source_and_existing_cache_claim(settings: OperatorSettings) -> None:
    im = make_model({"model": {"source": "file:///opt/models/smollm2", "servedName": "smol",
                               "cache": {"claimName": "shared-cache"}}})
    deployment = render_deployment(im, settings)
    assert container(deployment)["args"][:4] == ["--model", "/opt/models/smollm2", "--served-model-name", "smol"]
    assert deployment["spec"]["template"]["spec"]["volumes"] == [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-cache"}}]
    assert render_cache_pvc(im) is None


def test_cpu_model_uses_the_cpu_image_without_gpus(settings: OperatorSettings) -> None:
    im = make_model({"model": HF, "resources": {"gpus": 0, "requests": {"cpu": 2, "memory": "4Gi"}}})
    deployment = render_deployment(im, settings)
    assert container(deployment)["image"] == "registry.example/engine-cpu:1"
    assert container(deployment)["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}}
    assert "tolerations" not in deployment["spec"]["template"]["spec"]


def test_scheduling_resources_and_pod_overrides(settings: OperatorSettings) -> None:
    im = make_model({
        "model": HF,
        "image": "my/engine:2", "imagePullPolicy": "Always", "imagePullSecrets": [{"name": "regcred"}],
        "resources": {"gpus": 1, "gpuResourceName": "amd.com/gpu", "limits": {"memory": "32Gi"}},
        "scheduling": {"nodeSelector": {"gpu": "h100"}, "priorityClassName": "high", "runtimeClassName": "nvidia",
                       "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                       "affinity": {"nodeAffinity": {}}},
        "podTemplate": {"labels": {"team": "ml", "kubeinfer.dev/model": "hijack"}, "annotations": {"a": "b"},
                        "serviceAccountName": "engine"},
        "monitoring": {"podAnnotations": False},
        "startupTimeoutSeconds": 95, "terminationGracePeriodSeconds": 300, "preStopSleepSeconds": 15,
    })
    deployment = render_deployment(im, settings)
    pod = deployment["spec"]["template"]["spec"]
    engine = container(deployment)
    assert engine["image"] == "my/engine:2" and engine["imagePullPolicy"] == "Always"
    assert engine["resources"] == {"limits": {"memory": "32Gi", "amd.com/gpu": "1"}}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                                  {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["affinity"] == {"nodeAffinity": {}}
    assert pod["priorityClassName"] == "high" and pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == "engine" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["terminationGracePeriodSeconds"] == 300
    assert engine["lifecycle"] == {"preStop": {"sleep": {"seconds": 15}}}
    assert engine["startupProbe"]["failureThreshold"] == 10  # ceil(95 / 10)
    template_meta = deployment["spec"]["template"]["metadata"]
    assert template_meta == {"labels": {"team": "ml", **LABELS}, "annotations": {"a": "b"}}


def test_gpu_taint_toleration_can_be_turned_off(settings: OperatorSettings) -> None:
    im = make_model({"model": HF, "scheduling": {"tolerateGpuTaint": False}})
    assert "tolerations" not in render_deployment(im, settings)["spec"]["template"]["spec"]


def test_server_limits_and_tool_flags() -> None:
    im = make_model({"model": HF, "engine": {
        "maxRequestBodyBytes": "4Mi", "maxHeaderBytes": 65536, "requestTimeoutSeconds": 0,
        "toolCallParser": "hermes", "chatTemplate": "{{ messages }}"}})
    args = engine_args(im.spec)
    assert args[args.index("--max-request-body-bytes") + 1] == "4Mi"
    assert args[args.index("--max-header-bytes") + 1] == "65536"
    assert args[args.index("--request-timeout") + 1] == "0.0"
    assert args[args.index("--tool-call-parser") + 1] == "hermes"
    assert args[args.index("--chat-template") + 1] == "{{ messages }}"
    assert "--enable-auto-tool-choice" in args
    from kubeinfer.engine.server.cli import parse_args

    parsed = parse_args(args)  # what the pod's `kubeinfer serve` makes of them
    assert parsed.max_request_body_bytes == 4 << 20 and parsed.request_timeout is None
    assert parsed.enable_auto_tool_choice and parsed.tool_call_parser == "hermes"


def test_engine_flags_env_and_extra_args() -> None:
    im = make_model({"model": {**HF, "revision": "v2"}, "engine": {
        "maxNumSeqs": 64, "maxNumBatchedTokens": 4096, "blockSize": 32, "gpuMemoryUtilization": 0.85,
        "dtype": "bfloat16", "enablePrefixCaching": False, "quantization": "int8", "kvCacheDtype": "bfloat16",
        "extraArgs": ["--seed", "7"],
        "env": [{"name": "HF_HOME", "value": "/elsewhere"}, {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]}})
    assert engine_args(im.spec) == [
        "--model", "meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct",
        "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "1", "--dtype", "bfloat16",
        "--max-num-seqs", "64", "--max-num-batched-tokens", "4096", "--block-size", "32",
        "--gpu-memory-utilization", "0.85", "--quantization", "int8", "--kv-cache-dtype", "bfloat16",
        "--no-enable-prefix-caching", "--seed", "7"]
    settings = OperatorSettings()
    assert container(render_deployment(im, settings))["env"] == [
        {"name": "KUBEINFER_DRAIN_TIMEOUT", "value": "110"},
        {"name": "KUBEINFER_REVISION", "value": "v2"},
        {"name": "HF_HOME", "value": "/elsewhere"},
        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]


def test_service_exact() -> None:
    im = make_model({"model": HF, "service": {"type": "LoadBalancer", "annotations": {"lb": "internal"},
                                              "labels": {"expose": "yes"}}})
    assert render_service(im) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**META, "labels": {"expose": "yes", **LABELS}, "annotations": {"lb": "internal"}},
        "spec": {"type": "LoadBalancer", "selector": SELECTOR,
                 "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
                            "appProtocol": "http"}]},
    }


def test_hpa_exact() -> None:
    im = make_model({"model": HF, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8,
                                                  "targetQueueDepth": 3, "scaleDown": {"stabilizationWindowSeconds": 600}}})
    assert render_hpa(im, "queue_depth") == {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": META,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llama"},
            "minReplicas": 2,
            "maxReplicas": 8,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "queue_depth"},
                                                  "target": {"type": "AverageValue", "averageValue": "3"}}}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                            "policies": [{"type": "Pods", "value": 8, "periodSeconds": 15}]},
                "scaleDown": {"stabilizationWindowSeconds": 600, "selectPolicy": "Max",
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
            },
        },
    }
    assert render_hpa(make_model({"model": HF}), "queue_depth") is None


def test_hpa_scale_up_jumps_to_the_needed_count_by_default() -> None:
    """One evaluation may add up to maxReplicas pods: 1 -> 8 in one step, not one pod per period."""
    im = make_model({"model": HF, "autoscaling": {"enabled": True, "maxReplicas": 8}})
    up = render_hpa(im, "q")["spec"]["behavior"]["scaleUp"]
    assert up["stabilizationWindowSeconds"] == 0
    assert up["policies"] == [{"type": "Pods", "value": 8, "periodSeconds": 15}]


def test_hpa_behavior_is_configurable() -> None:
    im = make_model({"model": HF, "autoscaling": {
        "enabled": True, "maxReplicas": 10,
        "scaleUp": {"podsPerPeriod": 2, "percentPerPeriod": 50, "periodSeconds": 30, "stabilizationWindowSeconds": 5},
        "scaleDown": {"stabilizationWindowSeconds": 10, "podsPerPeriod": 3, "periodSeconds": 20}}})
    behavior = render_hpa(im, "q")["spec"]["behavior"]
    assert behavior["scaleUp"] == {"stabilizationWindowSeconds": 5, "selectPolicy": "Max", "policies": [
        {"type": "Pods", "value": 2, "periodSeconds": 30}, {"type": "Percent", "value": 50, "periodSeconds": 30}]}
    assert behavior["scaleDown"] == {"stabilizationWindowSeconds": 10, "selectPolicy": "Max",
                                     "policies": [{"type": "Pods", "value": 3, "periodSeconds": 20}]}


def test_pdb_only_with_more_than_one_replica() -> None:
    assert render_pdb(make_model({"model": HF, "replicas": 2})) == {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": META,
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}}
    assert render_pdb(make_model({"model": HF, "replicas": 1})) is None
    assert render_pdb(make_model({"model": HF, "replicas": 5, "autoscaling": {"enabled": True}})) is None
    assert render_pdb(make_model({"model": HF, "autoscaling": {"enabled": True, "minReplicas": 2}})) is not None


def test_cache_pvc_exact() -> None:
    im = make_model({"model": {**HF, "cache": {"size": "200Gi", "storageClassName": "fast",
                                               "accessModes": ["ReadWriteMany"]}}})
    assert render_cache_pvc(im) == {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {**META, "name": "llama-model-cache"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}},
                 "storageClassName": "fast"}}


def test_service_monitor_exact() -> None:
    im = make_model({"model": HF, "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    assert render_service_monitor(im) == {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {**META, "labels": {"release": "prom", **LABELS}},
        "spec": {"selector": {"matchLabels": SELECTOR}, "namespaceSelector": {"matchNames": ["ai"]},
                 "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}]}}
    assert render_service_monitor(make_model({"model": HF})) is None


def test_children_in_apply_order_with_unwanted_ones_as_none(settings: OperatorSettings) -> None:
    children = render_children(make_model({"model": HF}), settings)
    assert [(c.kind, c.name, c.manifest is not None) for c in children] == [
        ("PersistentVolumeClaim", "llama-model-cache", False), ("Deployment", "llama", True),
        ("Service", "llama", True), ("HorizontalPodAutoscaler", "llama", False),
        ("PodDisruptionBudget", "llama", False), ("ServiceMonitor", "llama", False)]


def test_drain_timeout_fills_the_grace_period_the_pre_stop_sleep_leaves() -> None:
    im = make_model({"model": HF, "terminationGracePeriodSeconds": 300, "preStopSleepSeconds": 15})
    env = {var["name"]: var.get("value") for var in container(render_deployment(im, OperatorSettings()))["env"]}
    assert env["KUBEINFER_DRAIN_TIMEOUT"] == "280"
