"""Generate charts/kubeinfer/values.schema.json (run after changing values.yaml or the CRD).

    python charts/generate_values_schema.py          # rewrite the schema
    python charts/generate_values_schema.py --check  # exit 1 when it is stale (a test runs this)

`models[].spec` embeds the InferenceModel CRD's own spec schema (strict: unknown fields rejected),
so a typo in a model declared in values fails at `helm install` — the API server would only prune it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

CHARTS = Path(__file__).resolve().parent
CHART = CHARTS / "kubeinfer"
CRD = CHART / "crds" / "inferencemodels.kubeinfer.dev.yaml"
SCHEMA = CHART / "values.schema.json"
KUBERNETES_ONLY = ("x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                   "x-kubernetes-map-type", "x-kubernetes-embedded-resource", "default", "nullable")


def to_json_schema(node: Any) -> Any:
    """A CRD (OpenAPI v3) schema as plain JSON Schema: int-or-string as anyOf, unknown fields rejected.
    Walks schemas only (never treats a property *name* such as `format` as a keyword)."""
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string") is True:
        out: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        if "pattern" in node:
            out["anyOf"][1]["pattern"] = node["pattern"]
        return out
    out = {}
    for key, value in node.items():
        if key in KUBERNETES_ONLY or key == "x-kubernetes-preserve-unknown-fields":
            continue
        if key in ("properties", "patternProperties") and isinstance(value, dict):
            out[key] = {name: to_json_schema(schema) for name, schema in value.items()}
        elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
            out[key] = [to_json_schema(schema) for schema in value]
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # OpenAPI 3.0's boolean flag → JSON Schema's number.
        if isinstance(out.get(exclusive), bool) and out.pop(exclusive) and bound in out:
            out[exclusive] = out.pop(bound)
    return out


def model_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    spec = copy.deepcopy(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return {**to_json_schema(spec), "description": "InferenceModel spec (the CRD's schema)."}


QUANTITY = {
    "description": "A Kubernetes quantity, never negative (e.g. 500m, 2Gi, 1).",
    "anyOf": [{"type": "string", "pattern": r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+]?[0-9]+|[munkMGTPE]|[KMGTPE]i)?$"},
              {"type": "number", "minimum": 0}],
}
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
REF = {name: {"$ref": f"#/definitions/{name}"} for name in
       ("quantity", "resourceList", "resources", "pullPolicy", "imageTag", "imageRepository")}


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
    """A closed object: keys outside `properties` are typos."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


def string(description: str, **rules: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **rules}


def boolean(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


def string_map(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string"}}


def image(with_pull_policy: bool) -> dict[str, Any]:
    properties = {"repository": REF["imageRepository"], "tag": REF["imageTag"]}
    if with_pull_policy:
        properties["pullPolicy"] = REF["pullPolicy"]
    return obj(properties, ("repository",))


def build() -> dict[str, Any]:
    interval = string("A Prometheus duration such as 30s or 1m.", pattern="^[0-9]+(ms|s|m|h)$")
    monitor = obj({"enabled": boolean("On/off."), "interval": interval, "labels": string_map("Labels.")})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "kubeinfer chart values",
        "definitions": {
            "quantity": QUANTITY,
            "resourceList": {"type": "object", "additionalProperties": REF["quantity"]},
            "resources": obj({"requests": REF["resourceList"], "limits": REF["resourceList"]},
                             description="Container resources (requests/limits)."),
            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
            "imageTag": string("Image tag; empty means the chart's appVersion.",
                               pattern="^$|^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"),
            "imageRepository": string("Image repository without tag.", minLength=1,
                                      pattern=r"^[^:@\s]+(:[0-9]+)?(/[^:@\s]+)*$"),
        },
        **obj({
            "nameOverride": string("Replaces the chart name in resource names.", maxLength=40),
            "fullnameOverride": string("Replaces the release-chart prefix of resource names.", maxLength=52),
            "imagePullSecrets": {"type": "array", "items": obj({"name": string("Secret name.", minLength=1)},
                                                               ("name",))},
            "operator": obj({
                "image": image(with_pull_policy=True),
                "replicas": {"type": "integer", "minimum": 0, "maximum": 1},
                "watchNamespaces": {"type": "array", "uniqueItems": True,
                                    "items": string("Namespace name.", pattern=DNS_LABEL, maxLength=63)},
                "logFormat": {"type": "string", "enum": ["json", "text"]},
                "queueMetricName": string("Custom metric name for the HPAs.", pattern="^[a-zA-Z_][a-zA-Z0-9_]*$"),
                "extraEnv": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                        "properties": {"name": {"type": "string", "minLength": 1}}}},
                "resources": REF["resources"],
                "nodeSelector": string_map("Node labels."),
                "tolerations": {"type": "array", "items": {"type": "object"}},
                "affinity": {"type": "object", "description": "Affinity rules."},
                "priorityClassName": {"type": "string"},
                "podAnnotations": string_map("Pod annotations."),
                "podLabels": string_map("Pod labels."),
            }),
            "engine": obj({"image": image(with_pull_policy=False), "cpuImage": image(with_pull_policy=False)}),
            "serviceAccount": obj({"create": boolean("Create it."),
                                   "name": string("Name.", pattern="^$|" + DNS_SUBDOMAIN),
                                   "annotations": string_map("Annotations.")}),
            "rbac": obj({"create": boolean("Create RBAC.")}),
            "metrics": obj({"serviceMonitor": monitor, "podMonitor": monitor}),
            "prometheusAdapter": obj({"enabled": boolean("On/off.")}),
            "keda": obj({"enabled": boolean("On/off."), "serverAddress": string("Prometheus URL.", pattern="^https?://"),
                         "query": string("PromQL template.", minLength=1),
                         "cooldownPeriod": {"type": "integer", "minimum": 0},
                         "pollingInterval": {"type": "integer", "minimum": 1}}),
            "grafana": obj({"dashboard": obj({"enabled": boolean("On/off."), "labels": string_map("Labels."),
                                              "annotations": string_map("Annotations."),
                                              "namespace": string("Namespace.", pattern="^$|" + DNS_LABEL)})}),
            "models": {"type": "array", "description": "InferenceModels created with the release.", "items": obj({
                "name": string("InferenceModel name (a DNS label).", pattern=DNS_LABEL, maxLength=63),
                "namespace": string("Namespace; default the release namespace.", pattern=DNS_LABEL, maxLength=63),
                "labels": string_map("Labels."),
                "annotations": string_map("Annotations."),
                "spec": model_spec_schema(),
            }, ("name", "spec"))},
        }),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the chart's values.schema.json")
    parser.add_argument("--check", action="store_true", help="exit 1 if values.schema.json is stale")
    args = parser.parse_args(argv)
    if args.check:
        if SCHEMA.read_text() != render():
            print("charts/kubeinfer/values.schema.json is stale: run python charts/generate_values_schema.py",
                  file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
