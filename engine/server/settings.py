"""What the HTTP layer needs to know beyond the engine configuration: the one home of the server's
defaults (the CLI flags and their `KUBEINFER_*` variables take theirs from here)."""

from __future__ import annotations

from dataclasses import dataclass

# --max-request-body-bytes when not given: room for a prompt that fills the context (a token is rarely more
# than 8 bytes of JSON-escaped text) plus room for tools, schemas and the other fields.
BODY_BYTES_PER_TOKEN = 8
BODY_BYTES_EXTRA = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 64 << 10  # request line + headers; beyond it: 431


def default_max_request_body_bytes(max_model_len: int) -> int:
    return BODY_BYTES_PER_TOKEN * max_model_len + BODY_BYTES_EXTRA


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
    max_request_body_bytes: int | None = None  # None: default_max_request_body_bytes(max_model_len)
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    request_timeout: float | None = 600.0  # seconds from submission to the last byte; None: no limit

    def body_limit(self, max_model_len: int | None) -> int:
        if self.max_request_body_bytes is not None:
            return self.max_request_body_bytes
        from kubeinfer.engine.config import DEFAULT_CPU_MAX_MODEL_LEN

        return default_max_request_body_bytes(max_model_len or DEFAULT_CPU_MAX_MODEL_LEN)
