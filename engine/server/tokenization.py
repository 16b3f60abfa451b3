"""`POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info` (vLLM's request and response shapes)."""

from __future__ import annotations

from typing import Any

from kubeinfer.engine.server.chat import ChatServing
from kubeinfer.engine.server.errors import bad_request
from kubeinfer.engine.server.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from kubeinfer.engine.server.serving import OpenAIServing

_TOKENIZE_ONLY_FIELDS = {"add_special_tokens", "return_token_strs"}
# Init kwargs that are objects, huge, or local paths rather than configuration.
_NOT_CONFIG = {"tokenizer_object", "added_tokens_decoder", "vocab_file", "tokenizer_file", "name_or_path"}


class TokenizationServing(OpenAIServing):
    def __init__(self, chat: ChatServing) -> None:
        super().__init__(chat.engine, chat.settings, chat.prompts)
        self.chat = chat

    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            fields = request.model_dump(exclude=_TOKENIZE_ONLY_FIELDS, exclude_none=True)
            chat_request = ChatCompletionRequest.model_validate(fields)
            text = await self.prompts.run(self.chat.render_text, chat_request)
        else:
            text = request.prompt
        # No context-length check: counting is the point (the body limit bounds the work).
        ids = await self.prompts.run(self.prompts.encode_blocking, text, request.add_special_tokens, "prompt")
        strs = list(self.tokenizer.convert_ids_to_tokens(ids)) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=self.engine.max_model_len or 0, tokens=ids, token_strs=strs
        )

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        vocab = self.engine.vocab_size
        if vocab is not None and request.tokens and max(request.tokens) >= vocab:
            raise bad_request(
                f"token id {max(request.tokens)} is out of range (vocabulary size {vocab})", "tokens"
            )
        return DetokenizeResponse(prompt=await self.prompts.run(self.tokenizer.decode, request.tokens))

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's configuration (its init kwargs, as vLLM returns them) plus what clients
        look for even when the config file lacks it: `eos_token`, `bos_token`, the chat template."""
        self.check_model(None)
        tokenizer = self.tokenizer
        info: dict[str, Any] = {
            key: value
            for key, value in dict(getattr(tokenizer, "init_kwargs", None) or {}).items()
            if key not in _NOT_CONFIG and not key.startswith("_")
        }
        for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                info[name] = value
        if getattr(tokenizer, "chat_template", None):
            info["chat_template"] = tokenizer.chat_template
        info["model_max_length"] = self.engine.max_model_len
        info["tokenizer_class"] = type(tokenizer).__name__
        return _jsonable(info)


def _jsonable(value: Any) -> Any:
    """Tokenizer configs hold AddedToken objects, sets and tuples: JSON gets their plain forms."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else str(value)
