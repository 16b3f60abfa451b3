"""What chat and completions share: model check, admission (engine errors -> HTTP), usage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from kubeinfer.engine.async_engine import (
    AsyncLLMEngine,
    EngineDrainingError,
    EngineNotReadyError,
    QueueFullError,
    RequestAbortedError,
    RequestOutputStream,
    RequestTimeoutError,
)
from kubeinfer.engine.errors import InvalidRequestError, RequestFailedError
from kubeinfer.engine.server.errors import OpenAIError, bad_request, unsupported
from kubeinfer.engine.server.logprobs import TokenText
from kubeinfer.engine.server.prompts import PromptProcessor
from kubeinfer.engine.server.protocol import SamplingFields
from kubeinfer.engine.server.settings import ServerSettings
from kubeinfer.engine.server.streaming import (
    SSE_HEADERS,
    ClientDisconnected,
    cancel_on_disconnect,
    sse_error,
)


def engine_error(exc: BaseException, settings: ServerSettings, prompt_param: str = "prompt") -> OpenAIError:
    """The engine's typed errors as HTTP: 400 (naming the field), 429, 503, 500 for a request it failed."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    if isinstance(exc, QueueFullError):
        return OpenAIError(429, str(exc), code="queue_full", headers=retry)
    if isinstance(exc, RequestTimeoutError):
        return OpenAIError(503, str(exc), code="request_timeout")
    if isinstance(exc, EngineDrainingError | EngineNotReadyError | RequestAbortedError):
        return OpenAIError(503, str(exc), code="unavailable", headers=retry)
    if isinstance(exc, InvalidRequestError):
        param = prompt_param if exc.param == "prompt" else exc.param
        return OpenAIError(400, exc.message, param=param, code=exc.code)
    if isinstance(exc, RequestFailedError):
        return OpenAIError(500, exc.message, code=exc.code)
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    raise exc


SERVED_ERRORS = (RequestAbortedError, RequestTimeoutError, RequestFailedError, ValueError)  # what a running request may end with


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, settings: ServerSettings, prompts: PromptProcessor) -> None:
        self.engine = engine
        self.settings = settings
        self.prompts = prompts
        self._token_text: TokenText | None = None

    @property
    def model_name(self) -> str:
        return self.engine.served_model_name or "unknown"

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    def check_request(self, request: SamplingFields) -> None:
        """Raise 503 before the model is ready (or while draining), 404 for another model, 400 for what
        no engine can serve (the engine validates the values themselves)."""
        self.check_model(request.model)
        if request.prompt_logprobs is not None and request.stream:
            raise unsupported("prompt_logprobs is not supported with stream", "prompt_logprobs")

    def check_model(self, model: str | None) -> None:
        """Raise 503 before the model is ready (or while draining) and 404 for another model."""
        if not self.engine.is_ready:
            raise engine_error(
                EngineDrainingError("the server is shutting down")
                if self.engine.state == "draining"
                else EngineNotReadyError(f"the model is not ready (engine {self.engine.state})"),
                self.settings,
            )
        if model is not None and model != self.model_name:
            raise OpenAIError(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )

    async def submit(
        self, jobs: list[tuple[str, list[int], Any]], prompt_param: str = "prompt"
    ) -> list[RequestOutputStream]:
        """Submit every (request_id, prompt_token_ids, params) and wait until the engine took them
        (at most one engine step), so that its refusals (it validates every request) become proper HTTP
        errors, the prompt's named `prompt_param`; all or nothing."""
        streams: list[RequestOutputStream] = []
        try:
            for request_id, prompt_ids, params in jobs:
                streams.append(
                    self.engine.add_request(request_id, prompt_ids, params, timeout=self.settings.request_timeout)
                )
            for stream in streams:
                await stream.wait_accepted()
        except BaseException as exc:
            for stream in streams:
                await stream.aclose()
            if isinstance(exc, Exception):
                raise engine_error(exc, self.settings, prompt_param) from exc
            raise
        return streams

    async def respond(
        self,
        raw: Request,
        *,
        stream: bool,
        collect: Callable[[], Any],
        events: Callable[[], AsyncIterator[str]],
    ) -> Response:
        """Non-streaming: await `collect()` (cancelled if the client leaves). Streaming: SSE of `events()`."""
        if stream:
            return StreamingResponse(
                self._guard_stream(events()), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            body = await cancel_on_disconnect(raw, collect())
        except ClientDisconnected:
            return Response(status_code=499)
        except SERVED_ERRORS as exc:
            raise engine_error(exc, self.settings) from exc
        return JSONResponse(body.model_dump(mode="json"))

    async def _guard_stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Errors after the headers are sent become an SSE error event (OpenAI's shape)."""
        try:
            async for event in events:
                yield event
        except SERVED_ERRORS as exc:
            yield sse_error(engine_error(exc, self.settings))
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def encode(
        self, text: str, *, add_special_tokens: bool, param: str, reserved_tokens: int | None = None
    ) -> list[int]:
        """Tokenise on the prompt pool (never on the event loop); refuse at once what cannot fit."""
        return await self.prompts.encode(
            text, add_special_tokens=add_special_tokens, param=param, reserved_tokens=reserved_tokens
        )
