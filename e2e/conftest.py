"""The kind cluster of the end-to-end test: created once, deleted at the end whatever happens."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e.kind import (
    REPO,
    Images,
    helm_install_command,
    kind_create_command,
    kind_delete_command,
    kind_load_command,
    missing_prerequisite,
)


def run(command: Sequence[str], timeout: float = 600) -> str:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@dataclass
class KindCluster:
    name: str
    kubeconfig: Path

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        return run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args], timeout=timeout)

    def get_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json"))


@pytest.fixture(scope="session")
def kind_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KindCluster]:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    images = Images()
    run(images.build_command(), timeout=3600)
    cluster = KindCluster(f"kubeinfer-e2e-{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("kind") / "kubeconfig")
    try:
        run(kind_create_command(cluster.name, cluster.kubeconfig), timeout=600)
        for image in (images.operator, images.engine_cpu):
            run(kind_load_command(cluster.name, image), timeout=900)
        run(helm_install_command(cluster.kubeconfig, images), timeout=600)
        yield cluster
    finally:
        subprocess.run(kind_delete_command(cluster.name), capture_output=True, timeout=300)
