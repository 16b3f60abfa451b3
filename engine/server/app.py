"""The FastAPI app factory: routes, OpenAI-shaped errors, auth, body limit; the engine starts with the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from kubeinfer.engine.async_engine import AsyncLLMEngine
from kubeinfer.engine.server.auth import ApiKeyMiddleware
from kubeinfer.engine.server.body_limit import BodySizeLimitMiddleware
from kubeinfer.engine.server.errors import install_error_handlers
from kubeinfer.engine.server.openapi import install_openapi
from kubeinfer.engine.server.prompts import PromptProcessor
from kubeinfer.engine.server.routes import build_router
from kubeinfer.engine.server.settings import ServerSettings


def build_app(engine: AsyncLLMEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    prompts = PromptProcessor(lambda: engine.tokenizer, lambda: engine.max_model_len)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()  # loads the model on the engine thread; /health answers meanwhile
        try:
            yield
        finally:
            engine.shutdown()
            prompts.shutdown()

    app = FastAPI(
        title="kubeinfer", summary="OpenAI-compatible LLM server", version="0.1.0", lifespan=lifespan
    )
    install_error_handlers(app)
    # The last added runs first: auth refuses strangers before their body is read, then the size limit.
    app.add_middleware(BodySizeLimitMiddleware, limit=lambda: settings.body_limit(engine.max_model_len))
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.include_router(build_router(engine, settings, prompts))
    install_openapi(
        app,
        api_key=bool(settings.api_key),
        limits=lambda: {
            "max_num_seqs": getattr(engine.config, "max_num_seqs", None),
            "max_model_len": engine.max_model_len,
            "vocab_size": engine.vocab_size,
        },
    )
    app.state.engine = engine
    app.state.settings = settings
    return app
