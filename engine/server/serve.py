"""Run the server: uvicorn driven programmatically so that we own startup and shutdown.

SIGTERM (or Ctrl-C): `/ready` turns 503 and new work gets 503 at once, in-flight requests
finish (up to `--drain-timeout`, then they are aborted), uvicorn closes, exit 0. A second
signal forces the exit. A model that fails to load exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Generator

import uvicorn
from kubeinfer.engine.async_engine import AsyncLLMEngine
from kubeinfer.engine.server.app import build_app
from kubeinfer.engine.server.cli import SERVER_ONLY
from kubeinfer.engine.server.http_protocol import KubeinferH11Protocol
from kubeinfer.engine.server.logs import configure_logging
from kubeinfer.engine.server.settings import ServerSettings

logger = logging.getLogger("kubeinfer.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, settings: ServerSettings) -> None:
        super().__init__(config)
        self.engine = engine
        self.settings = settings
        self.exit_code = 0
        self.fatal = False
        self._draining = False
        self._background: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._draining:
            logger.warning("second signal %s: exiting now", signal.Signals(sig).name)
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        logger.info(
            "received %s: draining (grace %.0fs)", signal.Signals(sig).name, self.settings.drain_timeout
        )
        self._spawn(self._drain())

    async def _drain(self) -> None:
        clean = await self.engine.drain(self.settings.drain_timeout)
        logger.info("drained" if clean else "drain timeout: unfinished requests were aborted")
        self.should_exit = True

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        self._spawn(self._watch_loading())
        self._spawn(self._watch_fatal())

    async def _watch_fatal(self) -> None:
        reason = await self.engine.wait_fatal()
        logger.error("the engine failed for good (%s): exiting with 1", reason)
        self.exit_code = 1
        self.fatal = True
        self.should_exit = True

    async def _watch_loading(self) -> None:
        try:
            await self.engine.wait_until_loaded()
        except BaseException as exc:
            logger.error("the model failed to load: %s", exc)
            self.exit_code = 1
            self.should_exit = True

    def _spawn(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def run_server(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    from kubeinfer.engine.config import EngineConfig
    from pydantic import ValidationError

    engine_fields = {key: value for key, value in vars(args).items() if key not in SERVER_ONLY}
    try:
        config = EngineConfig(**engine_fields)
    except ValidationError as exc:
        logger.error("invalid engine configuration: %s", exc)
        return 2
    from kubeinfer.engine.server.chat_template import load_chat_template

    try:
        chat_template = load_chat_template(args.chat_template)
    except (OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        logger.error("--enable-auto-tool-choice needs --tool-call-parser")
        return 2
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_waiting_requests=args.max_waiting_requests,
        drain_timeout=args.drain_timeout,
        max_request_body_bytes=args.max_request_body_bytes,
        max_header_bytes=args.max_header_bytes,
        request_timeout=args.request_timeout,
        log_level=args.log_level,
        log_requests=not args.disable_log_requests,
        chat_template=chat_template,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
    )
    engine = AsyncLLMEngine(
        config,
        max_waiting_requests=settings.max_waiting_requests,
        log_requests=settings.log_requests,
        served_model_name=args.served_model_name,
    )
    app = build_app(engine, settings)
    uvicorn_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        http=KubeinferH11Protocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    server = GracefulServer(uvicorn_config, engine, settings)
    server.run()
    if server.fatal:  # the engine thread may be blocked in a collective for minutes: do not wait for it
        logging.shutdown()
        os._exit(server.exit_code)
    if not server.started and server.exit_code == 0:
        return 1  # could not bind the port
    return server.exit_code
