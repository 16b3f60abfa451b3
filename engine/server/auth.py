"""Bearer-token auth for `/v1/*` (probes and scrapers on /health, /ready, /metrics stay open)."""

from __future__ import annotations

import secrets

from kubeinfer.engine.server.errors import OpenAIError
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response


class ApiKeyMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, api_key: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app)
        self._expected = f"Bearer {api_key}".encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path.startswith("/v1/") or request.url.path == "/v1":
            given = request.headers.get("authorization", "").encode()
            if not secrets.compare_digest(given, self._expected):
                return OpenAIError(
                    401,
                    "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ).response()
        return await call_next(request)
