"""The test control plane itself: the pinned version, real scheduling onto fake GPU nodes (kwok),
GPU capacity limits, RBAC with real service-account tokens, garbage collection, clean teardown."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import K8sCluster, controlplane

pytestmark = pytest.mark.cluster


def wait_until(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def get_json(cluster: K8sCluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture
def namespace(k8s_cluster: K8sCluster):
    name = f"cp-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false")


def gpu_pod_spec(gpus: int) -> dict:
    return {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [
            {
                "name": "engine",
                "image": "example.invalid/engine:1",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ],
    }


def test_server_runs_the_pinned_version(k8s_cluster: K8sCluster) -> None:
    pinned = controlplane.pinned_versions()["K8S_VERSION"]
    versions = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == pinned
    assert versions["clientVersion"]["gitVersion"] == pinned
    assert k8s_cluster.server.startswith("https://127.0.0.1:")


def test_fake_gpu_nodes_advertise_gpus_and_taint(k8s_cluster: K8sCluster) -> None:
    nodes = get_json(k8s_cluster, "nodes", "-l", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")["items"]
    assert len(nodes) == 2
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]


def test_gpu_deployment_is_scheduled_on_a_gpu_node_and_becomes_ready(
    k8s_cluster: K8sCluster, namespace: str
) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "gpu-app", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "gpu-app"}},
            "template": {"metadata": {"labels": {"app": "gpu-app"}}, "spec": gpu_pod_spec(4)},
        },
    }
    k8s_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(deployment))
    k8s_cluster.kubectl("rollout", "status", "deployment/gpu-app", "-n", namespace, "--timeout=60s")
    pods = get_json(k8s_cluster, "pods", "-n", namespace, "-l", "app=gpu-app")["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
        assert pod["status"]["phase"] == "Running"
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"]
        assert ready == "True"

    # Garbage collection: deleting the Deployment removes its ReplicaSet and pods (owner references).
    k8s_cluster.kubectl("delete", "deployment", "gpu-app", "-n", namespace, "--cascade=background")
    wait_until(
        lambda: not get_json(k8s_cluster, "pods,replicasets", "-n", namespace)["items"],
        what="the garbage collector to delete the ReplicaSet and pods",
    )


def test_pod_asking_for_more_gpus_than_a_node_has_stays_unschedulable(
    k8s_cluster: K8sCluster, namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big", "namespace": namespace},
        "spec": gpu_pod_spec(9),
    }
    k8s_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(pod))

    def scheduled_condition() -> dict | None:
        status = get_json(k8s_cluster, "pod", "too-big", "-n", namespace)["status"]
        return next((c for c in status.get("conditions", []) if c["type"] == "PodScheduled"), None)

    condition = wait_until(scheduled_condition, what="the scheduler to judge the pod")
    assert condition["status"] == "False"
    assert condition["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in condition["message"]
    assert get_json(k8s_cluster, "pod", "too-big", "-n", namespace)["status"]["phase"] == "Pending"


def test_rbac_forbids_an_unprivileged_service_account(k8s_cluster: K8sCluster, namespace: str) -> None:
    user = f"system:serviceaccount:{namespace}:nobody"
    k8s_cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)

    impersonated = k8s_cluster.kubectl("get", "secrets", "-n", namespace, f"--as={user}", check=False)
    assert impersonated.returncode != 0
    assert "forbidden" in impersonated.stderr.lower()

    # A real token, signed with the service-account key pair and authenticated by the apiserver.
    token = k8s_cluster.kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()
    with_token = subprocess.run(
        [
            str(k8s_cluster.bin("kubectl")),
            "--kubeconfig=/dev/null",
            f"--server={k8s_cluster.server}",
            f"--certificate-authority={k8s_cluster.state_dir / 'pki' / 'ca.crt'}",
            f"--token={token}",
            "get",
            "secrets",
            "-n",
            namespace,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert with_token.returncode != 0
    assert f'User "{user}" cannot list resource "secrets"' in with_token.stderr

    k8s_cluster.kubectl(
        "create",
        "rolebinding",
        "nobody-view",
        "--clusterrole=view",
        f"--serviceaccount={namespace}:nobody",
        "-n",
        namespace,
    )
    allowed = k8s_cluster.kubectl("get", "configmaps", "-n", namespace, f"--as={user}")
    assert allowed.returncode == 0


def test_python_client_talks_to_the_cluster(k8s_cluster: K8sCluster) -> None:
    from kubernetes import client

    with k8s_cluster.api_client() as api:
        names = {n.metadata.name for n in client.CoreV1Api(api).list_node().items}
    assert {"kwok-gpu-0", "kwok-gpu-1", "kwok-cpu-0"} <= names


def test_stop_leaves_no_process_behind(k8s_cluster: K8sCluster) -> None:
    """A second, independent control plane starts on other ports and stop() kills every component."""
    with tempfile.TemporaryDirectory(prefix="kubeinfer-cp-test-") as tmp:
        plane = controlplane.ControlPlane(Path(tmp), gpu_nodes=1, cpu_nodes=0, die_with_parent=True)
        plane.start()
        try:
            assert plane.server != k8s_cluster.server
            pids = [p.pid for p in plane.processes.values()]
            assert len(pids) == len(controlplane.COMPONENTS)
        finally:
            plane.stop()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_garbage_collector_knows_the_crd_kinds_installed_by_the_fixture(
    k8s_cluster: K8sCluster, namespace: str
) -> None:
    """The fixture installs crds/ before the controller-manager starts, so owner references to
    custom resources are collected at once (not only after the GC's ~30 s rediscovery)."""
    if not (controlplane.REPO / "crds" / "inferencemodels.kubeinfer.dev.yaml").exists():
        pytest.skip("crds/inferencemodels.kubeinfer.dev.yaml does not exist yet")
    owner = {
        "apiVersion": "kubeinfer.dev/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "owner", "namespace": namespace},
        "spec": {"model": {"source": "hf://org/name"}},
    }
    k8s_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(owner))
    uid = get_json(k8s_cluster, "inferencemodel", "owner", "-n", namespace)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "kubeinfer.dev/v1alpha1",
                    "kind": "InferenceModel",
                    "name": "owner",
                    "uid": uid,
                }
            ],
        },
    }
    k8s_cluster.kubectl("apply", "-f", "-", stdin=json.dumps(child))
    k8s_cluster.kubectl("delete", "inferencemodel", "owner", "-n", namespace)
    wait_until(
        lambda: (
            k8s_cluster.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0
        ),
        timeout=20,
        what="the garbage collector to delete the child of the deleted InferenceModel",
    )
