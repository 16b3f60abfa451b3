"""Prompt processing off the event loop: tokenisation and chat-template rendering on a small thread pool.

A 1 MB prompt takes seconds to tokenise; on the event loop it would stall every other request (and the
probes). The fast tokenizer's batch call releases the GIL, so the pool also leaves the engine thread
alone. Before tokenising, the character count bounds the token count from below (no token covers more
characters than the vocabulary's longest token string), so a prompt that cannot fit is refused at once.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kubeinfer.engine.server.errors import OpenAIError, bad_request

T = TypeVar("T")

# Normalizers that never delete characters (so a token still covers at most its string's length of input).
_LENGTH_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace", "Precompiled"}


def max_token_chars(tokenizer: Any) -> int | None:
    """The most input characters one token can stand for, or None when the tokenizer gives no such bound
    (a normalizer that may delete characters, a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    normalizer = json.loads(backend.to_str()).get("normalizer")
    if not _length_safe(normalizer):
        return None
    longest = max((len(token) for token in tokenizer.get_vocab()), default=0)
    return longest or None


def _length_safe(normalizer: dict[str, Any] | None) -> bool:
    if normalizer is None:
        return True
    if normalizer.get("type") == "Sequence":
        return all(_length_safe(n) for n in normalizer.get("normalizers", []))
    if normalizer.get("type") == "Replace":
        return bool(normalizer.get("content"))
    return normalizer.get("type") in _LENGTH_SAFE_NORMALIZERS


class PromptProcessor:
    """Owns the tokenisation pool; one per app, shared by chat, completions and tokenizer routes."""

    def __init__(
        self, tokenizer: Callable[[], Any], max_model_len: Callable[[], int | None], workers: int = 2
    ):
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubeinfer-prompts")
        self._max_token_chars: int | bool | None = False  # False: not computed yet

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(
        self, text: str, *, add_special_tokens: bool, param: str, reserved_tokens: int | None = None
    ) -> list[int]:
        """Token ids of `text`; 400 (context_length_exceeded) without tokenising when its length alone
        shows that it cannot fit beside `reserved_tokens` (the requested completion; at least 1)."""
        self.check_length(text, reserved_tokens, param)
        return await self.run(self.encode_blocking, text, add_special_tokens, param)

    def check_length(self, text: str, reserved_tokens: int | None, param: str) -> None:
        max_model_len = self._max_model_len()
        per_token = self._chars_per_token()
        if not max_model_len or not per_token:
            return
        at_least = math.ceil(len(text) / per_token)
        reserved = max(1, reserved_tokens or 0)
        if at_least + reserved > max_model_len:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, the prompt has "
                f"{len(text)} characters, so at least {at_least} tokens"
                + (f", plus {reserved_tokens} requested for the completion" if reserved_tokens else "")
                + ". Please reduce the length of the prompt or the completion.",
                # The field to change, named as the engine does: the prompt when it cannot fit even alone.
                param="max_tokens" if reserved_tokens and at_least < max_model_len else param,
                code="context_length_exceeded",
            )

    def _chars_per_token(self) -> int | None:
        if self._max_token_chars is False:
            tokenizer = self._tokenizer()
            if tokenizer is None:
                return None
            self._max_token_chars = max_token_chars(tokenizer)
        return self._max_token_chars  # type: ignore[return-value]

    def encode_blocking(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Tokenise here and now (on the pool: see `run`)."""
        tokenizer = self._tokenizer()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        try:
            if backend is not None:  # the batch call releases the GIL (the single one does not)
                return list(backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except (TypeError, UnicodeError) as exc:
            raise bad_request("the text cannot be tokenised (it is not valid Unicode)", param) from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
