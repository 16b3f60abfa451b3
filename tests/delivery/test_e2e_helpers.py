"""The kind e2e test's pure helpers (e2e/kind.py), checked where Docker is absent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from e2e.kind import (
    REPO,
    Images,
    condition_true,
    forwarded_port,
    helm_install_command,
    is_ready,
    kind_create_command,
    kind_load_command,
    missing_prerequisite,
    wait_until,
)


def completed(returncode: int, stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], returncode, "", stderr)


def test_missing_prerequisite_names_what_is_missing() -> None:
    everything = lambda tool: f"/usr/bin/{tool}"  # noqa: E731
    assert "docker CLI is not installed" in missing_prerequisite(which=lambda t: None, run=lambda c: completed(0))
    reason = missing_prerequisite(which=everything, run=lambda c: completed(1, "Cannot connect to the Docker daemon"))
    assert reason is not None and "no Docker engine reachable" in reason and "Cannot connect" in reason
    no_kind = lambda tool: None if tool == "kind" else f"/usr/bin/{tool}"  # noqa: E731
    assert "kind is not on PATH" in missing_prerequisite(which=no_kind, run=lambda c: completed(0))
    assert missing_prerequisite(which=everything, run=lambda c: completed(0)) is None


def test_images_follow_hack_images_sh_naming() -> None:
    images = Images(prefix="reg.local/k", tag="t1")
    assert images.operator == "reg.local/k/operator:t1" and images.engine_cpu == "reg.local/k/engine:t1-cpu"
    command = images.build_command()
    assert "IMAGES=engine-cpu operator" in command and command[-1].endswith("hack/images.sh")
    script = (REPO / "hack" / "images.sh").read_text()
    assert 'engine-cpu) ref="$IMAGE_PREFIX/engine:$TAG-cpu"' in script
    assert 'operator) ref="$IMAGE_PREFIX/operator:$TAG"' in script


def test_kind_commands() -> None:
    assert kind_create_command("c", Path("/k"), wait="60s") == [
        "kind", "create", "cluster", "--name", "c", "--kubeconfig", "/k", "--wait", "60s"]
    assert kind_load_command("c", "img:1") == ["kind", "load", "docker-image", "img:1", "--name", "c"]


def test_helm_install_uses_the_loaded_images(tmp_path: Path) -> None:
    command = helm_install_command(tmp_path / "kubeconfig", Images(prefix="reg.local:5000/k", tag="e2e"))
    sets = dict(command[i + 1].split("=", 1) for i, word in enumerate(command) if word == "--set")
    assert sets == {"operator.image.repository": "reg.local:5000/k/operator", "operator.image.tag": "e2e",
                    "operator.image.pullPolicy": "Never", "engine.cpuImage.repository": "reg.local:5000/k/engine",
                    "engine.cpuImage.tag": "e2e-cpu"}
    assert command[:3] == ["helm", "install", "kubeinfer"] and "--wait" in command


def test_every_value_the_e2e_sets_exists_in_the_chart(helm_or_none: str | None, tmp_path: Path) -> None:
    if helm_or_none is None:
        pytest.skip("helm is not built")
    command = helm_install_command(tmp_path / "kubeconfig", Images())
    sets = [word for i, word in enumerate(command) if i and command[i - 1] == "--set"]
    args = [helm_or_none, "template", "x", str(REPO / "charts" / "kubeinfer"), "--kube-version", "1.34.0"]
    for value in sets:
        args += ["--set", value]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ghcr.io/kubeinfer/engine:e2e-cpu" in result.stdout


@pytest.fixture
def helm_or_none() -> str | None:
    from tests.delivery.tools import find_tool

    return find_tool("helm")


def test_forwarded_port() -> None:
    assert forwarded_port("Forwarding from 127.0.0.1:41234 -> 8000\n") == 41234
    assert forwarded_port("Forwarding from [::1]:41234 -> 8000") is None
    assert forwarded_port("error: unable to forward port") is None


def test_readiness_needs_the_latest_generation_ready_and_enough_replicas() -> None:
    def model(generation: int, observed: int, ready: str, ready_replicas: int) -> dict:
        return {"metadata": {"generation": generation},
                "status": {"observedGeneration": observed, "readyReplicas": ready_replicas,
                           "conditions": [{"type": "Ready", "status": ready}]}}

    assert is_ready(model(2, 2, "True", 1))
    assert not is_ready(model(2, 1, "True", 1)), "an old generation's Ready does not count"
    assert not is_ready(model(1, 1, "False", 1))
    assert not is_ready(model(1, 1, "True", 1), replicas=2)
    assert is_ready(model(1, 1, "True", 2), replicas=2)
    assert not is_ready({"metadata": {"generation": 1}})
    assert not condition_true({"status": {"conditions": None}}, "Ready")


def test_wait_until_returns_the_value_or_times_out_with_the_last_one() -> None:
    now = [0.0]
    sleep = lambda seconds: now.__setitem__(0, now[0] + seconds)  # noqa: E731
    values = iter([None, [], "done"])
    assert wait_until(lambda: next(values), timeout=10, interval=1, clock=lambda: now[0], sleep=sleep) == "done"
    assert now[0] == 2
    with pytest.raises(TimeoutError, match="waiting for pods; last: 0"):
        wait_until(lambda: 0, timeout=5, interval=2, what="pods", clock=lambda: now[0], sleep=sleep)
