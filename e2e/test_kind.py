"""End to end on kind: chart → operator → SmolLM2 on the CPU → chat with the OpenAI client → scale → delete.

Needs Docker, kind, kubectl and helm (skips with the reason otherwise). Run with `make e2e`.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator

import pytest
from openai import OpenAI

from e2e.conftest import KindCluster
from e2e.kind import REPO, forwarded_port, is_ready, wait_until

EXAMPLE = REPO / "manifests" / "examples" / "smollm2-cpu.yaml"
NAMESPACE = "default"
MODEL = "smollm2"


@pytest.fixture(scope="module")
def model(kind_cluster: KindCluster) -> Iterator[str]:
    kind_cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
    try:
        wait_until(lambda: is_ready(kind_cluster.get_json("inferencemodel", MODEL, "-n", NAMESPACE)),
                   timeout=900, interval=5, what=f"InferenceModel {MODEL} Ready")
        yield MODEL
    finally:
        kind_cluster.kubectl("delete", "-n", NAMESPACE, "-f", str(EXAMPLE), "--ignore-not-found", "--wait=true",
                             timeout=300)


@pytest.fixture
def base_url(kind_cluster: KindCluster, model: str) -> Iterator[str]:
    """`kubectl port-forward service/<model> :8000`, the local port read from its first line."""
    process = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(kind_cluster.kubeconfig), "-n", NAMESPACE, "port-forward",
         f"service/{model}", ":8000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port: list[int] = []

        def read_port() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                if (found := forwarded_port(line)) is not None:
                    port.append(found)
                    return

        threading.Thread(target=read_port, daemon=True).start()
        wait_until(lambda: port, timeout=60, interval=0.5, what="kubectl port-forward")
        yield f"http://127.0.0.1:{port[0]}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_chat_through_the_service(base_url: str, model: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused", timeout=120)
    assert model in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello in one word."}], max_tokens=16, temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_kubectl_scale_to_two(kind_cluster: KindCluster, model: str) -> None:
    kind_cluster.kubectl("scale", "-n", NAMESPACE, f"inferencemodel/{model}", "--replicas=2")
    wait_until(lambda: is_ready(kind_cluster.get_json("inferencemodel", model, "-n", NAMESPACE), replicas=2),
               timeout=900, interval=5, what=f"{model} with 2 ready replicas")
    deployment = kind_cluster.get_json("deployment", model, "-n", NAMESPACE)
    assert deployment["spec"]["replicas"] == 2
