"""Test factories for InferenceModel objects."""

from __future__ import annotations

from typing import Any

from kubeinfer.operator.spec import InferenceModel


def make_model(spec: dict[str, Any], name: str = "llama", namespace: str = "ai") -> InferenceModel:
    return InferenceModel.from_body({"metadata": {"name": name, "namespace": namespace, "uid": "uid-1",
                                                  "generation": 3}, "spec": spec})
