"""413 for a request body over `--max-request-body-bytes`, decided before anything parses it.

A plain ASGI middleware: a `Content-Length` over the limit is refused from the headers alone (the body
is never read; uvicorn discards what the client still sends and keeps the connection); a body without
one (chunked) is read up to the limit and refused as soon as it passes it. An accepted body is handed
on as read, so the app sees the request unchanged and later `receive()` calls (disconnects) pass through.
"""

from __future__ import annotations

from collections.abc import Callable

from kubeinfer.engine.server.errors import OpenAIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_WITH_BODY = {"POST", "PUT", "PATCH"}


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes (--max-request-body-bytes).",
        code="request_too_large",
    )


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await body_too_large(limit).response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body was complete
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await body_too_large(limit).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 rejects a malformed Content-Length before we get here
    return None
