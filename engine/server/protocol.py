"""Pydantic models of the OpenAI chat/completions protocol (plus vLLM's extra sampling fields).

Unknown request fields are ignored, as OpenAI does. Field bounds follow OpenAI's documentation;
a value out of bounds becomes an OpenAI-shaped 400 (see errors.py). Requests are validated strictly
(`"max_tokens": "5"` is a 400, not 5: a number or boolean must be one) and no string may hold a lone
surrogate (`"\ud800"` is valid JSON but not Unicode text).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

NonNegativeInt = Annotated[int, Field(ge=0)]
NonEmptyText = Annotated[str, Field(min_length=1)]
_TOKEN_ID_KEY = r"^[0-9]{1,9}$"
# token id (as a string) -> bias in [-100, 100]; the JSON schema says so with propertyNames.
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=_TOKEN_ID_KEY)], Annotated[float, Field(ge=-100, le=100)]],
    WithJsonSchema({"type": "object", "propertyNames": {"pattern": _TOKEN_ID_KEY},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                    "description": "token id (as a string) -> bias added to its logit"}),
]
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidTextError(ValueError):
    """A string in the request is not valid Unicode; `param` is where (e.g. ``messages.0.content``)."""

    def __init__(self, param: str) -> None:
        super().__init__(f"{param} contains a lone surrogate, which is not valid Unicode text")
        self.param = param


def _normalise(value: Any, path: tuple[str, ...]) -> Any:
    """The parsed JSON with integral floats as ints (JSON Schema counts 1.0 as an integer; strict
    validation would not: 1.0 is accepted where an integer is expected, never 1.5 or "1"); raises
    InvalidTextError at the first string (or key) with a lone surrogate."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            raise InvalidTextError(".".join(path) or "body")
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, str) and _LONE_SURROGATE.search(key):
                raise InvalidTextError(".".join(path) or "body")
            out[key] = _normalise(item, (*path, str(key)))
        return out
    if isinstance(value, list):
        return [_normalise(item, (*path, str(i))) for i, item in enumerate(value)]
    return value


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class OpenAIRequest(OpenAIModel):
    """A request body (or a part of one): strict types, Unicode text only."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _normalised(cls, data: Any) -> Any:
        return _normalise(data, ())


# ---------------------------------------------------------------- requests


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class TextContentPart(OpenAIRequest):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(OpenAIRequest):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIRequest):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this is the result of

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(OpenAIRequest):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _exactly_one_constraint(schema: dict[str, Any]) -> None:
    """The JSON schema of `structured_outputs`: exactly one constraint, none of them null (or a false
    json_object, which asks for nothing)."""
    for prop in schema["properties"].values():
        options = [o for o in prop.pop("anyOf", []) if o != {"type": "null"}]
        if options:
            prop.update(options[0] if len(options) == 1 else {"anyOf": options})
        prop.pop("default", None)
    schema["properties"]["json_object"]["const"] = True
    schema.update(minProperties=1, maxProperties=1)


class StructuredOutputsRequest(OpenAIRequest):
    """vLLM's ``structured_outputs`` request field: exactly one of these."""

    # A constraint we do not know must not be dropped silently: unknown keys are a 400. The schema states
    # "exactly one" (the engine checks it: StructuredOutputsParams).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra=_exactly_one_constraint)

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[NonEmptyText] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(OpenAIRequest):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIRequest):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"] = "function"
    function: NamedFunction


class SamplingFields(OpenAIRequest):
    """Fields shared by chat and completions requests (OpenAI's and vLLM's)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: NonEmptyText | list[NonEmptyText] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI documents it
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="used when stream is true")
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[NonNegativeInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    logit_bias: LogitBias | None = None
    allowed_token_ids: list[NonNegativeInt] | None = Field(None, min_length=1)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def wants_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="alternatives per token when logprobs is true (without it: no logprobs)"
    )
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]
# An empty prompt (or list) is refused: the model needs at least one token to continue from.
CompletionPrompt = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    prompt: CompletionPrompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 only with echo (score the prompt)
    best_of: int | None = Field(None, ge=1)
    suffix: None = Field(None, description="not supported: must be absent or null")


# ---------------------------------------------------------------- responses


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class FunctionCallDelta(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _now() -> int:
    return int(time.time())


class PromptLogprob(OpenAIModel):
    """vLLM's per-token entry of `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "kubeinfer"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


def dump(model: BaseModel, **kwargs: Any) -> str:
    return model.model_dump_json(**kwargs)


# ---------------------------------------------------------------- tokenizer endpoints (vLLM's shapes)


class TokenizeCompletionRequest(OpenAIRequest):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIRequest):
    """Chat messages rendered by the chat template, as `/v1/chat/completions` would render them: with the
    fields that rendering reads (vLLM's shape); other chat fields, which change no token, are ignored."""

    model_config = ConfigDict(protected_namespaces=())
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[NonNegativeInt]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class VersionResponse(OpenAIModel):
    version: str
