"""A model waiting for a Secret it names turns Ready seconds after the Secret appears, not at the next resync.

Its own operator process (namespaced to one fresh namespace, its own Lease) runs with a 10-minute
resync, so only the operator's recheck of missing references can make the model Ready in time. The
module sorts before test_cluster.py so that the session's operator (3 s resync) is not running yet.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.cluster import Kube, OperatorProcess, wait_for
from tests.operator.conftest import OPERATOR_NAMESPACE
from tests.operator.test_cluster import condition, get_im, inference_model, wait_phase

pytestmark = pytest.mark.cluster


@pytest.fixture
def slow_resync_operator(kube: Kube, operator_kubeconfig: str, tmp_path: Path) -> Iterator[tuple[str, OperatorProcess]]:
    namespace = f"r-{uuid.uuid4().hex[:8]}"
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    process = OperatorProcess(operator_kubeconfig, tmp_path / "operator.log", lease_namespace=OPERATOR_NAMESPACE,
                              resync_seconds=600, identity="slow-resync")
    process.env |= {"KUBEINFER_OPERATOR_NAMESPACES": namespace, "KUBEINFER_LEASE_NAME": f"slow-{namespace}"}
    process.start()
    yield namespace, process
    process.stop()
    kube.delete("v1", "Namespace", None, namespace)


def test_model_turns_ready_seconds_after_its_secret_appears(kube: Kube, slow_resync_operator) -> None:
    namespace, process = slow_resync_operator
    kube.create(inference_model("gated", namespace, model={
        "source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "tokenSecretRef": {"name": "hf-token"}}))
    body = wait_phase(kube, namespace, "gated", "Failed", timeout=60)
    assert condition(body, "Degraded")["reason"] == "SecretNotFound"
    time.sleep(3)  # past the first rechecks: the model keeps waiting, it was not given up on
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token", "namespace": namespace},
                 "stringData": {"token": "hf_x"}})
    created = time.monotonic()
    wait_for(lambda: kube.get("apps/v1", "Deployment", namespace, "gated"), timeout=15,
             what=f"the Deployment soon after the Secret (resync is 600 s)\n{process.tail()}")
    wait_phase(kube, namespace, "gated", "Ready", timeout=30)
    took = time.monotonic() - created
    assert took < 20, f"Ready {took:.1f}s after the Secret appeared"
    assert condition(get_im(kube, namespace, "gated"), "Ready")["status"] == "True"
