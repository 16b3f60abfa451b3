"""What the HTTP layer needs to know beyond the engine configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    max_waiting_requests: int | None = None  # None: unbounded queue (no 429)
    drain_timeout: float = 30.0  # seconds to finish in-flight requests after SIGTERM
    log_level: str = "info"
    log_requests: bool = True
    retry_after_s: int = 1  # Retry-After on 429 and 503
    chat_template: str | None = None  # the template text (--chat-template), instead of the model's
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
