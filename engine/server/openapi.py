"""The OpenAPI document as the server really behaves (FastAPI's default one differs in several places).

- Validation errors are 400 in the OpenAI error shape, never 422; every route lists the errors it can
  send (400, 401 under /v1 with an API key, 404, 413 for bodies, 429, 503), all with the error schema.
- `stream: true` answers `text/event-stream` (server-sent events of the chunk objects, then `[DONE]`).
- `/v1/*` needs `Authorization: Bearer <key>` when the server has one (a bearer `securitySchemes`).
- `/health` and `/ready` answer 503 with the same body when the engine failed / is not ready.
- Limits known only at run time are in the schemas: `n` up to `--max-num-seqs`, token counts below the
  context length, token ids below the vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_DESCRIPTIONS = {
    400: "Invalid request; also what the schema cannot state: a prompt that does not fit the context beside "
    "the completion (code `context_length_exceeded`), fields this server does not support together (code "
    "`unsupported_combination`), a JSON schema, regex or grammar that does not compile (code `invalid_grammar`) "
    "and token ids outside the model's vocabulary (code `token_id_out_of_vocabulary`)",
    401: "Missing or wrong API key",
    404: "Unknown model or route",
    413: "Request body over --max-request-body-bytes",
    429: "The waiting queue is full (see Retry-After)",
    503: "The model is loading or the server is draining (see Retry-After)",
}
_SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, each `data: <chunk JSON>` (an error after the first event is "
    '`data: {"error": ...}`), ending with `data: [DONE]`.'
)
# One server-sent event: `data` is a chunk's JSON, an error's JSON or `[DONE]`.
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
_QUEUED = {"/v1/chat/completions", "/v1/completions"}


def _error(status: int) -> dict[str, Any]:
    return {"description": _DESCRIPTIONS[status], "content": {"application/json": {"schema": ERROR_REF}}}


def install_openapi(app: FastAPI, *, api_key: bool, limits: Callable[[], dict[str, int | None]]) -> None:
    """`limits()`: `max_num_seqs`, and once the model is loaded `max_model_len` and `vocab_size` (the
    document is cached from then on)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        known = limits()
        _rewrite(doc, api_key=api_key, limits=known)
        if known.get("max_model_len") is not None:
            app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite(doc: dict[str, Any], *, api_key: bool, limits: dict[str, int | None]) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path in ("/health", "/ready"):
                ok = responses["200"]
                responses["503"] = {
                    "description": "Not ready (loading, draining or failed)",
                    "content": ok["content"],
                }
                continue
            if path == "/metrics" or path == "/version":
                continue
            statuses = [400, 404, 503]
            if method == "post":
                statuses.append(413)
            if path in _QUEUED:
                statuses.append(429)
            if api_key and path.startswith("/v1"):
                statuses.append(401)
                operation["security"] = [{"bearer": []}]
            for status in [s for s in list(responses) if s.isdigit() and int(s) >= 400]:
                responses.pop(status)
            for status in sorted(statuses):
                responses[str(status)] = _error(status)
            if path in _QUEUED:
                ok = responses["200"]
                ok["description"] = "The completion; " + _SSE_DESCRIPTION
                ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    _runtime_limits(schemas, limits)


def _runtime_limits(schemas: dict[str, Any], limits: dict[str, int | None]) -> None:
    requests = [schemas[name] for name in ("ChatCompletionRequest", "CompletionRequest") if name in schemas]
    for schema in requests:
        props = schema["properties"]
        if limits.get("max_num_seqs"):
            props["n"]["maximum"] = limits["max_num_seqs"]
        if limits.get("max_model_len"):  # a prompt has at least one token
            for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
                for option in _options(props.get(field)):
                    if option.get("type") == "integer":
                        option["maximum"] = limits["max_model_len"] - 1
    vocab = limits.get("vocab_size")
    for schema in requests if vocab else []:
        fields = ("stop_token_ids", "allowed_token_ids", "bad_words_token_ids")
        for option in [o for f in fields if f in schema["properties"] for o in _walk(schema["properties"][f])]:
            if option.get("type") == "integer":
                option["maximum"] = vocab - 1
    if vocab and "CompletionRequest" in schemas:
        for option in _walk(schemas["CompletionRequest"]["properties"]["prompt"]):
            if option.get("type") == "integer":
                option["maximum"] = vocab - 1
    if vocab and "DetokenizeRequest" in schemas:
        for option in _walk(schemas["DetokenizeRequest"]["properties"]["tokens"]):
            if option.get("type") == "integer":
                option["maximum"] = vocab - 1


def _options(schema: dict[str, Any] | None) -> list[dict[str, Any]]:
    if schema is None:
        return []
    return list(schema.get("anyOf", [schema]))


def _walk(schema: Any) -> list[dict[str, Any]]:
    """Every sub-schema (anyOf options, array items) of a schema."""
    found: list[dict[str, Any]] = []
    if isinstance(schema, dict):
        found.append(schema)
        for option in schema.get("anyOf", []):
            found.extend(_walk(option))
        if "items" in schema:
            found.extend(_walk(schema["items"]))
    return found
