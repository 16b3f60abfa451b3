"""values.schema.json turns each class of mistake into an error at `helm install` time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.delivery.conftest import CHART, helm_template
from tests.delivery.tools import REPO

BAD_VALUES = {
    "unknown top-level key": ({"replicaCount": 2}, "replicaCount"),
    "typo in a nested key": ({"operator": {"watchNamespace": ["a"]}}, "watchNamespace"),
    "wrong type": ({"operator": {"replicas": "two"}}, "replicas"),
    "out of range": ({"operator": {"replicas": 3}}, "replicas"),
    "bad enum": ({"operator": {"logFormat": "xml"}}, "logFormat"),
    "bad image pull policy": ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
    "negative cpu": ({"operator": {"resources": {"requests": {"cpu": "-100m"}}}}, "cpu"),
    "negative memory number": ({"operator": {"resources": {"limits": {"memory": -1}}}}, "memory"),
    "unknown resources section": ({"operator": {"resources": {"request": {"cpu": "1"}}}}, "request"),
    "namespace not a DNS label": ({"operator": {"watchNamespaces": ["Team_A"]}}, "watchNamespaces"),
    "image tag with a colon": ({"engine": {"image": {"tag": "1.0:cpu"}}}, "tag"),
    "model without spec": ({"models": [{"name": "m"}]}, "spec"),
    "model with a bad name": ({"models": [{"name": "My Model", "spec": {}}]}, "name"),
    "bad scrape interval": ({"metrics": {"podMonitor": {"interval": "often"}}}, "interval"),
    "metric name with a colon": ({"operator": {"queueMetricName": "vllm:num_requests_waiting"}}, "queueMetricName"),
    "pull secret as a string": ({"imagePullSecrets": ["regcred"]}, "imagePullSecrets"),
    "typo in a model spec": ({"models": [{"name": "m", "spec": {"model": {"source": "hf://a/b"},
                                                              "resources": {"gpu": 1}}}]}, "gpu"),
    "bad enum in a model spec": ({"models": [{"name": "m", "spec": {"model": {"source": "hf://a/b"},
                                                                  "engine": {"dtype": "fp8"}}}]}, "dtype"),
}


@pytest.mark.parametrize("values, key", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_fail_at_install_time(helm: str, tmp_path: Path, values: dict, key: str) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm_template(helm, "-f", str(path))
    assert result.returncode != 0, f"helm accepted {values}"
    assert "schema" in result.stderr and key in result.stderr, result.stderr


def test_the_default_values_and_documented_shapes_pass(helm: str, tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({
        "operator": {"resources": {"requests": {"cpu": 0.5, "memory": "1.5Gi"}, "limits": {"cpu": "2"}},
                     "watchNamespaces": ["team-a"], "logFormat": "text"},
        "engine": {"image": {"tag": "0.1.0-rc.1"}},
        "models": [{"name": "m", "namespace": "team-a", "spec": {"model": {"source": "hf://org/m"}}}],
    }))
    result = helm_template(helm, "-f", str(path))
    assert result.returncode == 0, result.stderr


def test_schema_is_generated_from_the_current_crd() -> None:
    result = subprocess.run([sys.executable, str(REPO / "charts" / "generate_values_schema.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_example_is_a_valid_models_entry(helm: str, tmp_path: Path) -> None:
    """The shipped examples can be pasted under `models:` as they are."""
    models = []
    for path in sorted((REPO / "manifests" / "examples").glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        models.append({"name": manifest["metadata"]["name"], "spec": manifest["spec"]})
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"models": models}))
    result = helm_template(helm, "-f", str(values))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("kind: InferenceModel") == len(models)


def test_every_value_is_documented_in_values_yaml() -> None:
    """Each key of the schema appears in values.yaml with a comment above it (or is a section)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()

    def walk(node: dict, data: dict, path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            assert key in data, f"{path}{key} is in the schema but not in values.yaml"
            if sub.get("type") == "object" and sub.get("additionalProperties") is False and "properties" in sub:
                walk(sub, data[key], f"{path}{key}.")
                continue
            index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
            assert lines[index - 1].strip().startswith("#"), f"{path}{key} has no comment"

    walk(schema, values, "")
