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
)
from kubeinfer.engine.server.errors import OpenAIError, bad_request
from kubeinfer.engine.server.logprobs import TokenText
from kubeinfer.engine.server.protocol import SamplingFields
from kubeinfer.engine.server.settings import ServerSettings
from kubeinfer.engine.server.streaming import SSE_HEADERS, ClientDisconnected, cancel_on_disconnect, sse


def engine_error(exc: BaseException, settings: ServerSettings) -> OpenAIError:
    retry = {"Retry-After": str(settings.retry_after_s)}
    if isinstance(exc, QueueFullError):
        return OpenAIError(429, str(exc), code="queue_full", headers=retry)
    if isinstance(exc, EngineDrainingError | EngineNotReadyError | RequestAbortedError):
        return OpenAIError(503, str(exc), code="unavailable", headers=retry)
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    raise exc


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
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
        """Raise 503 before the model is ready (or while draining), 404 for another model, 400 for
        stream options without streaming."""
        self.check_model(request.model)
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if request.prompt_logprobs is not None and request.stream:
            raise bad_request("prompt_logprobs is not supported with stream", "prompt_logprobs")

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

    async def submit(self, jobs: list[tuple[str, list[int], Any]]) -> list[RequestOutputStream]:
        """Submit every (request_id, prompt_token_ids, params) and wait until the engine took them
        (at most one engine step), so that its refusals become proper HTTP errors; all or nothing."""
        streams: list[RequestOutputStream] = []
        try:
            for request_id, prompt_ids, params in jobs:
                streams.append(self.engine.add_request(request_id, prompt_ids, params))
            for stream in streams:
                await stream.wait_accepted()
        except BaseException as exc:
            for stream in streams:
                await stream.aclose()
            if isinstance(exc, Exception):
                raise engine_error(exc, self.settings) from exc
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
        except (RequestAbortedError, ValueError) as exc:
            raise engine_error(exc, self.settings) from exc
        return JSONResponse(body.model_dump(mode="json"))

    async def _guard_stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Errors after the headers are sent become an SSE error event (OpenAI's shape)."""
        try:
            async for event in events:
                yield event
        except (RequestAbortedError, ValueError) as exc:
            yield sse(engine_error(exc, self.settings).body())
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.vocab_size
        if not ids:
            raise bad_request("the prompt is empty", param)
        if vocab is not None and max(ids) >= vocab:
            raise bad_request(f"token id {max(ids)} is out of range (vocabulary size {vocab})", param)
