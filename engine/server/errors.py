"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kubeinfer.engine.server.protocol import ErrorInfo, ErrorResponse, InvalidTextError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("kubeinfer.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """Raised anywhere in a request; becomes an OpenAI-shaped JSON error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        error_type = _TYPE_BY_STATUS.get(self.status, "invalid_request_error")
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=error_type, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_request")


def unsupported(message: str, param: str | None = None) -> OpenAIError:
    """A combination of valid fields that this server does not implement (the OpenAPI document says so)."""
    return OpenAIError(400, message, param=param, code="unsupported_combination")


def _from_validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON", code="invalid_json")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidTextError):
        return OpenAIError(400, str(cause), param=cause.param, code="invalid_unicode")
    location = []
    for part in first.get("loc", ())[1:] if first.get("loc", ("",))[0] == "body" else first.get("loc", ()):
        if isinstance(part, str) and re.search(r"[\[\-]", part):
            break  # a union member's tag (`constrained-str`, `list[int]`): the field ends before it
        location.append(str(part))
    param = ".".join(location) or None
    message = first.get("msg", "invalid value")
    return bad_request(f"{param}: {message}" if param else message, param)


_CODE_BY_STATUS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body that is not UTF-8 (or not decodable at all)
            return OpenAIError(400, "the request body is not valid UTF-8 JSON", code="invalid_json").response()
        code = _CODE_BY_STATUS.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving %s %s", request.method, request.url.path)
        return OpenAIError(500, "internal server error (logged by the server)", code="internal_error").response()
