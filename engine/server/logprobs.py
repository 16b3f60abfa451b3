"""The engine's per-token logprobs (`list[dict[token_id, Logprob]]`) in OpenAI's two shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kubeinfer.engine.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


class TokenText:
    """Token id -> its text, cached (the tokenizer call is the slow part)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int, logprob: Any = None) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        if decoded is not None:
            return decoded
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def _ranked(entries: dict[int, Any]) -> list[tuple[int, Any]]:
    return sorted(entries.items(), key=lambda item: -item[1].logprob)


def _logprob_value(value: float) -> float:
    """JSON has no -inf or NaN: clamp like vLLM does."""
    return -9999.0 if math.isnan(value) or value < -9999.0 else value


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Any]], top: int, text_of: TokenText
) -> ChatLogprobs:
    content = []
    for token_id, entries in zip(token_ids, logprobs, strict=False):
        sampled = entries.get(token_id)
        token = text_of(token_id, sampled)
        tops = [
            TopLogprob(
                token=(t := text_of(tid, lp)), logprob=_logprob_value(lp.logprob), bytes=list(t.encode())
            )
            for tid, lp in _ranked(entries)[:top]
        ]
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=_logprob_value(sampled.logprob if sampled is not None else float("-inf")),
                bytes=list(token.encode()),
                top_logprobs=tops,
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Any]],
    top: int,
    text_of: TokenText,
    first_offset: int = 0,
) -> CompletionLogprobs:
    result = CompletionLogprobs()
    offset = first_offset
    for token_id, entries in zip(token_ids, logprobs, strict=False):
        sampled = entries.get(token_id)
        token = text_of(token_id, sampled)
        result.tokens.append(token)
        result.token_logprobs.append(_logprob_value(sampled.logprob) if sampled is not None else None)
        top_map = {text_of(tid, lp): _logprob_value(lp.logprob) for tid, lp in _ranked(entries)[:top]}
        if sampled is not None:
            top_map.setdefault(token, _logprob_value(sampled.logprob))
        result.top_logprobs.append(top_map if top > 0 else None)
        result.text_offset.append(offset)
        offset += len(token)
    return result
