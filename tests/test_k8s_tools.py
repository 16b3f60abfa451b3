"""The tools hack/k8s/build.sh builds are the pinned versions (no cluster needed; see k8s_bin)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import controlplane, k8s_bin

PINS = controlplane.pinned_versions()


def version_output(name: str, *args: str) -> str:
    result = subprocess.run(
        [str(k8s_bin(name)), *args], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "args", "pin"),
    [
        ("kube-apiserver", ("--version",), "K8S_VERSION"),
        ("kube-controller-manager", ("--version",), "K8S_VERSION"),
        ("kube-scheduler", ("--version",), "K8S_VERSION"),
        ("kubectl", ("version", "--client"), "K8S_VERSION"),
        ("etcd", ("--version",), "ETCD_VERSION"),
        ("kwok", ("--version",), "KWOK_VERSION"),
        ("helm", ("version", "--short"), "HELM_VERSION"),
        ("kubeconform", ("-v",), "KUBECONFORM_VERSION"),
    ],
)
def test_tool_reports_its_pinned_version(name: str, args: tuple[str, ...], pin: str) -> None:
    expected = PINS[pin]
    if name == "etcd":
        expected = expected.removeprefix("v")  # etcd prints "etcd Version: 3.7.0"
    assert expected in version_output(name, *args)
