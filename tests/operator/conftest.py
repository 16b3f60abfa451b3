"""Fixtures shared by the operator tests."""

from __future__ import annotations

import pytest
from kubeinfer.operator.settings import OperatorSettings


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    for var in ("KUBEINFER_ENGINE_IMAGE", "KUBEINFER_ENGINE_CPU_IMAGE", "KUBEINFER_QUEUE_METRIC_NAME"):
        monkeypatch.delenv(var, raising=False)
    return OperatorSettings(engine_image="registry.example/engine:1", engine_cpu_image="registry.example/engine-cpu:1")
