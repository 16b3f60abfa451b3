"""The HTTP routes. Request handling lives in chat.py and completions.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from kubeinfer.engine.async_engine import AsyncLLMEngine
from kubeinfer.engine.server.chat import ChatServing
from kubeinfer.engine.server.completions import CompletionServing
from kubeinfer.engine.server.errors import OpenAIError
from kubeinfer.engine.server.prompts import PromptProcessor
from kubeinfer.engine.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)
from kubeinfer.engine.server.settings import ServerSettings
from kubeinfer.engine.server.tokenization import TokenizationServing
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)}


def build_router(engine: AsyncLLMEngine, settings: ServerSettings, prompts: PromptProcessor) -> APIRouter:
    router = APIRouter()
    chat = ChatServing(engine, settings, prompts)
    completions = CompletionServing(engine, settings, prompts)
    tokenization = TokenizationServing(chat)

    @router.get("/health", tags=["probes"])
    async def health() -> Response:
        """200 while the process and its engine thread are alive (also during model loading)."""
        if engine.state == "failed":
            return JSONResponse({"status": "failed"}, status_code=503)
        return JSONResponse({"status": "ok", "state": engine.state})

    @router.get("/ready", tags=["probes"])
    async def ready() -> Response:
        """200 only when the model is loaded and the server accepts work; 503 while loading or draining."""
        status = 200 if engine.is_ready else 503
        return JSONResponse({"ready": engine.is_ready, "state": engine.state}, status_code=status)

    @router.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, tags=["openai"])
    async def list_models() -> ModelList:
        if engine.served_model_name is None or engine.state in ("loading", "failed"):
            raise OpenAIError(
                503,
                "the model is still loading",
                code="unavailable",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        card = ModelCard(
            id=engine.served_model_name, root=engine.served_model_name, max_model_len=engine.max_model_len
        )
        return ModelList(data=[card])

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=ERROR_RESPONSES,
        tags=["openai"],
    )
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(body, raw)

    @router.post(
        "/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES, tags=["openai"]
    )
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await completions.create(body, raw)

    @router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES, tags=["tokenizer"])
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """A `prompt`, or chat `messages` rendered through the chat template (vLLM's shapes)."""
        return await tokenization.tokenize(body)

    @router.post(
        "/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES, tags=["tokenizer"]
    )
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await tokenization.detokenize(body)

    @router.get("/tokenizer_info", responses=ERROR_RESPONSES, tags=["tokenizer"])
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(tokenization.tokenizer_info())

    @router.get("/version", response_model=VersionResponse, tags=["probes"])
    async def version() -> VersionResponse:
        return VersionResponse(version=package_version())

    return router


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubeinfer")
    except PackageNotFoundError:
        return "0.0.0+unknown"
