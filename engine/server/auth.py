"""Bearer-token auth for `/v1/*` (probes and scrapers on /health, /ready, /metrics stay open).

A plain ASGI middleware: it never wraps the response body, so streaming and disconnects pass through."""

from __future__ import annotations

import secrets

from kubeinfer.engine.server.errors import OpenAIError
from starlette.types import ASGIApp, Receive, Scope, Send


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            scheme, _, token = given.strip().partition(b" ")
            # The scheme is case-insensitive (RFC 9110 section 11.1); the key is not.
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self._expected):
                response = OpenAIError(
                    401,
                    "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
