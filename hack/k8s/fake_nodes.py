"""Fake nodes that kwok keeps Ready: GPU nodes (8 x nvidia.com/gpu, tainted like real GPU pools)
and an untainted CPU-only node. Node status (capacity, allocatable) may be set on create."""

from __future__ import annotations

import json

MANAGED_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPUS_PER_NODE = 8
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def node(name: str, *, gpus: int, cpu: str, memory: str, instance_type: str) -> dict:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": instance_type,
        "type": "kwok",
    }
    resources = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "500Gi"}
    taints = []
    if gpus:
        labels |= {
            "nvidia.com/gpu.product": GPU_PRODUCT,
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.present": "true",
        }
        resources[GPU_RESOURCE] = str(gpus)
        taints.append({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {MANAGED_ANNOTATION: "fake"}},
        "spec": {"taints": taints},
        "status": {
            "capacity": resources,
            "allocatable": resources,
        },
    }


def manifest(gpu_nodes: int = 2, cpu_nodes: int = 1) -> str:
    """A v1 List of the nodes, as JSON (kubectl apply -f - reads it)."""
    items = [
        node(f"kwok-gpu-{i}", gpus=GPUS_PER_NODE, cpu="96", memory="1024Gi", instance_type="p5.48xlarge")
        for i in range(gpu_nodes)
    ]
    items += [
        node(f"kwok-cpu-{i}", gpus=0, cpu="16", memory="64Gi", instance_type="m6i.4xlarge")
        for i in range(cpu_nodes)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
