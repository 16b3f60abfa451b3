"""The OpenAPI document as the server really behaves (FastAPI's default one differs in several places).

- Validation errors are 400 in the OpenAI error shape, never 422; every route lists the errors it can
  send (400, 401 under /v1 with an API key, 404, 413 for bodies, 429, 503), all with the error schema.
- `stream: true` answers `text/event-stream` (server-sent events of the chunk objects, then `[DONE]`).
- `/v1/*` needs `Authorization: Bearer <key>` when the server has one (a bearer `securitySchemes`).
- `/health` and `/ready` answer 503 with the same body when the engine failed / is not ready.
- A request's limits the server knows only at run time (`n` up to `--max-num-seqs`) are in the schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_DESCRIPTIONS = {
    400: "Invalid request (also a prompt that does not fit the context: code `context_length_exceeded`)",
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
_QUEUED = {"/v1/chat/completions", "/v1/completions"}


def _error(status: int) -> dict[str, Any]:
    return {"description": _DESCRIPTIONS[status], "content": {"application/json": {"schema": ERROR_REF}}}


def install_openapi(app: FastAPI, *, api_key: bool, max_num_seqs: int | None) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _rewrite(doc, api_key=api_key, max_num_seqs=max_num_seqs)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite(doc: dict[str, Any], *, api_key: bool, max_num_seqs: int | None) -> None:
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
                ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    if max_num_seqs is not None:
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            if name in schemas:
                schemas[name]["properties"]["n"]["maximum"] = max_num_seqs
