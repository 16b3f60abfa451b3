"""The engine's typed errors: what a caller did wrong, or what went wrong with one request.

The engine validates every request once (``SamplingParams`` for what needs no model, ``LLMEngine.add_request``
for what does: vocabulary, context length, KV cache). The server maps these to OpenAI-shaped HTTP errors:
``InvalidRequestError`` -> 400 naming ``param``, ``RequestFailedError`` -> 500. Both carry a message meant
for the user (no internals).
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request that can never run as asked (HTTP 400). ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested output do not fit ``max_model_len`` (OpenAI's ``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = "prompt") -> None:
        super().__init__(message, param, code="context_length_exceeded")


class RequestFailedError(RuntimeError):
    """The engine failed this request alone (sampling, stopping, detokenising...) or its step's forward
    (HTTP 500). The others in the step went on."""

    def __init__(self, message: str, code: str = "internal_error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
