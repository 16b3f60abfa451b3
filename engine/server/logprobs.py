"""The engine's per-token logprobs (`list[dict[token_id, Logprob]]`) in OpenAI's two shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kubeinfer.engine.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)


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


def prompt_completion_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Any] | None], top: int, text_of: TokenText
) -> CompletionLogprobs:
    """The prompt's part of `echo` with `logprobs` (OpenAI's shape): the first token has no logprob."""
    result = CompletionLogprobs()
    offset = 0
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        if entries is None:
            token = text_of(token_id)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            sampled = entries[token_id]
            token = text_of(token_id, sampled)
            result.token_logprobs.append(_logprob_value(sampled.logprob))
            top_map = {text_of(tid, lp): _logprob_value(lp.logprob) for tid, lp in _ranked(entries)[:top]}
            top_map.setdefault(token, _logprob_value(sampled.logprob))
            result.top_logprobs.append(top_map)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def concat_logprobs(head: CompletionLogprobs, tail: CompletionLogprobs | None) -> CompletionLogprobs:
    if tail is None:
        return head
    return CompletionLogprobs(
        text_offset=head.text_offset + tail.text_offset,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        tokens=head.tokens + tail.tokens,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
    )


def engine_prompt_logprobs(output: Any) -> PromptLogprobs | None:
    """The engine's `RequestOutput.prompt_logprobs` in vLLM's JSON shape."""
    entries = output.prompt_logprobs
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            str(tid): PromptLogprob(
                logprob=_logprob_value(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token
            )
            for tid, lp in entry.items()
        }
        for entry in entries
    ]
