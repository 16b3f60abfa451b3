"""Offline JSON schemas for kubeconform, made from a real kube-apiserver's OpenAPI and our CRD.

kubeconform normally downloads schemas; here there is no internet. We ask the test cluster's
API server for `/openapi/v2` (the same source the public schema sets are generated from), and
convert the InferenceModel CRD's `openAPIV3Schema`, writing one file per kind in the layout
`{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json` (core kinds under `v1/`).
Strict like `kubeconform -strict`: objects with listed properties reject unknown fields.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

SCHEMA_LOCATION = "{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}


def schema_file(root: Path, api_version: str, kind: str) -> Path:
    """Where kubeconform looks for a kind with SCHEMA_LOCATION (its Group is `v1` for core kinds)."""
    group, _, version = api_version.rpartition("/")
    return root / (group or version) / f"{kind.lower()}_{version}.json"


SCHEMA_MAPS = ("properties", "definitions", "patternProperties")  # name → schema
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
SCHEMA_VALUES = ("items", "additionalProperties", "not")


def _strict(node: Any) -> Any:
    """Walk a schema (not its property *names*): int-or-string becomes a oneOf; objects with
    properties get additionalProperties false unless they preserve unknown fields."""
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string") is True:
        return {**INT_OR_STRING, "description": node.get("description", "")}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _strict(schema) for name, schema in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_strict(schema) for schema in value]
        elif key in SCHEMA_VALUES and isinstance(value, dict):
            out[key] = _strict(value)
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def definitions_from_openapi_v2(document: dict[str, Any]) -> dict[str, Any]:
    definitions = {name: _strict(schema) for name, schema in document["definitions"].items()}
    if QUANTITY in definitions:  # a string in OpenAPI, but YAML numbers (`cpu: 1`) are fine too
        definitions[QUANTITY] = {"oneOf": [{"type": "string"}, {"type": "number"}]}
    return definitions


def kinds_in_openapi_v2(document: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(apiVersion, kind) → definition name, for every top-level kind the server describes."""
    found: dict[tuple[str, str], str] = {}
    for name, definition in document["definitions"].items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            found.setdefault((api_version, gvk["kind"]), name)
    return found


def crd_schemas(crd: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → standalone strict schema for each served version of a CRD."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schemas = {}
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        properties = schema.setdefault("properties", {})
        properties["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        properties["kind"] = {"type": "string", "enum": [kind]}
        properties["metadata"] = {"type": "object"}
        schema["additionalProperties"] = False
        schema.setdefault("required", [])
        schema["required"] = sorted({*schema["required"], "apiVersion", "kind", "metadata"})
        schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def write_schemas(root: Path, openapi_v2: dict[str, Any], crds: list[dict[str, Any]],
                  wanted: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Write the schema files of the `wanted` kinds; return the ones that no source describes."""
    definitions = definitions_from_openapi_v2(openapi_v2)
    kinds = kinds_in_openapi_v2(openapi_v2)
    custom = {key: schema for crd in crds for key, schema in crd_schemas(crd).items()}
    missing = []
    for api_version, kind in sorted(wanted):
        if (api_version, kind) in custom:
            schema = custom[(api_version, kind)]
        elif (api_version, kind) in kinds:
            schema = {"$ref": f"#/definitions/{kinds[(api_version, kind)]}", "definitions": definitions}
        else:
            missing.append((api_version, kind))
            continue
        path = schema_file(root, api_version, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema))
    return missing
