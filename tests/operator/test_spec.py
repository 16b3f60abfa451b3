"""The pydantic spec: defaults equal the CRD's, and the CRD's cross-field rules are re-checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeinfer.operator.spec import InferenceModelSpec
from pydantic import ValidationError

CRD = Path(__file__).parents[2] / "crds" / "inferencemodels.kubeinfer.dev.yaml"


def crd_schema() -> dict[str, Any]:
    return yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def crd_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """The object the API server's defaulting makes of `{}` (nested `default: {}` objects filled in)."""
    out: dict[str, Any] = {}
    for key, prop in (schema.get("properties") or {}).items():
        if "default" not in prop:
            continue
        value = prop["default"]
        if isinstance(value, dict) and prop.get("type") == "object":
            value = {**value, **crd_defaults(prop)}
        out[key] = value
    return out


def test_pydantic_defaults_equal_crd_defaults() -> None:
    spec_schema = crd_schema()["properties"]["spec"]
    defaulted = {"model": {"source": "hf://org/name"}, **crd_defaults(spec_schema)}
    from_crd = InferenceModelSpec.model_validate(defaulted).model_dump()
    from_pydantic = InferenceModelSpec.model_validate({"model": {"source": "hf://org/name"}}).model_dump()
    assert from_crd == from_pydantic


def test_every_crd_spec_field_is_known_to_pydantic() -> None:
    """extra=forbid: a field in the CRD but not in pydantic would make valid CRs fail to parse."""
    def walk(schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") == "object" and "properties" in schema:
            return {key: walk(prop) for key, prop in schema["properties"].items()}
        if schema.get("type") == "array" and schema["items"].get("properties"):
            return [walk(schema["items"])]  # type: ignore[return-value]
        return sample(schema)

    def sample(schema: dict[str, Any]) -> Any:
        if "enum" in schema:
            return schema["enum"][0]
        if schema.get("x-kubernetes-int-or-string"):
            return "1Gi"
        if schema.get("type") == "integer":
            return max(2, schema.get("minimum", 0))
        return {"string": "x", "number": 0.5, "boolean": True,
                "object": {}, "array": []}[schema.get("type", "object")]

    full = walk(crd_schema()["properties"]["spec"])
    full["model"] = {"source": "hf://org/name", "revision": "main", "servedName": "m",
                     "tokenSecretRef": {"name": "hf", "key": "token"}, "cache": {"size": "10Gi"}}
    full["resources"]["gpus"] = 2
    full["terminationGracePeriodSeconds"], full["preStopSleepSeconds"] = 30, 5
    full["monitoring"]["serviceMonitor"]["interval"] = "15s"
    full["autoscaling"]["minReplicas"] = 1
    parsed = InferenceModelSpec.model_validate(full)
    assert parsed.engine.max_num_seqs == 2 and parsed.resources.requests.ephemeral_storage == "1Gi"
    assert parsed.engine.block_size == 8 and parsed.service.type == "ClusterIP"


@pytest.mark.parametrize("spec, message", [
    ({"model": {"source": "s3://bucket/model"}}, "model.source must be"),
    ({"model": {"source": "hf://org/name", "cache": {}}}, "exactly one of claimName"),
    ({"model": {"source": "hf://org/name", "cache": {"claimName": "a", "size": "1Gi"}}}, "exactly one of claimName"),
    ({"model": {"source": "hf://org/name"}, "engine": {"tensorParallelSize": 4}, "resources": {"gpus": 2}},
     "at least engine.tensorParallelSize"),
    ({"model": {"source": "hf://org/name"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     "minReplicas must not exceed"),
    ({"model": {"source": "hf://org/name"}, "autoscaling": {"enabled": True, "minReplicas": 0}},
     "minReplicas: 0 needs the chart's KEDA mode"),
    ({"model": {"source": "hf://org/name"}, "terminationGracePeriodSeconds": 5, "preStopSleepSeconds": 5},
     "greater than preStopSleepSeconds"),
    ({"model": {"source": "hf://org/name"}, "unknownField": 1}, "Extra inputs are not permitted"),
])
def test_invalid_specs_are_rejected_with_a_clear_message(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InferenceModelSpec.model_validate(spec)


@pytest.mark.parametrize("source, scheme, expected", [
    ("hf://Qwen/Qwen2.5-7B-Instruct", "hf", "Qwen/Qwen2.5-7B-Instruct"),
    ("pvc://weights/llama/8b", "pvc", ("weights", "llama/8b")),
    ("pvc://weights", "pvc", ("weights", "")),
    ("file:///opt/models/smollm2", "file", "/opt/models/smollm2"),
])
def test_source_parsing(source: str, scheme: str, expected: Any) -> None:
    model = InferenceModelSpec.model_validate({"model": {"source": source}}).model
    assert model.scheme == scheme
    assert {"hf": model.hf_repo, "pvc": model.pvc_claim_and_path, "file": model.file_path}[scheme] == expected


def test_served_name_defaults_like_vllm() -> None:
    def served(model: dict[str, Any]) -> str:
        return InferenceModelSpec.model_validate({"model": model}).served_name

    assert served({"source": "hf://org/Name-7B"}) == "org/Name-7B"
    assert served({"source": "pvc://w/models/llama-8b"}) == "llama-8b"
    assert served({"source": "hf://org/x", "servedName": "chat"}) == "chat"


def test_engine_enums_are_the_engines_own_lists() -> None:
    """The CRD and the spec offer exactly what `kubeinfer serve` accepts (one list each, in the engine)."""
    from kubeinfer.engine.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS
    from kubeinfer.engine.server.cli import TOOL_CALL_PARSERS
    from kubeinfer.operator.spec import EngineSpec

    engine = crd_schema()["properties"]["spec"]["properties"]["engine"]["properties"]
    assert engine["quantization"]["enum"] == list(QUANTIZATION_METHODS)
    assert engine["kvCacheDtype"]["enum"] == list(KV_CACHE_DTYPES)
    assert engine["toolCallParser"]["enum"] == TOOL_CALL_PARSERS
    for field, values in (("quantization", QUANTIZATION_METHODS), ("kv_cache_dtype", KV_CACHE_DTYPES),
                          ("tool_call_parser", TOOL_CALL_PARSERS)):
        annotation = str(EngineSpec.model_fields[field].annotation)
        assert all(repr(v) in annotation for v in values), (field, annotation)


@pytest.mark.parametrize("size", ["4Mi", "1048576", 1048576, "2.5Mi", "3M"])
def test_size_quantities_parse_the_way_the_engine_reads_them(size: str | int) -> None:
    """What the CRD's pattern lets through, `--max-request-body-bytes` accepts."""
    import re

    from kubeinfer.engine.config import parse_size

    pattern = crd_schema()["properties"]["spec"]["properties"]["engine"]["properties"]["maxRequestBodyBytes"]["pattern"]
    assert isinstance(size, int) or re.fullmatch(pattern, size)
    assert parse_size(size) > 0
