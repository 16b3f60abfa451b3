"""Incremental detokenisation and stop strings.

Text is produced token by token without re-decoding the whole output: with a fast tokenizer,
the ``tokenizers`` library's ``DecodeStream`` (prefix/read offsets in Rust); otherwise vLLM's
prefix/read-offset algorithm over ``convert_ids_to_tokens`` strings. Both hold back a token
whose text would end in U+FFFD (a multi-byte character split across tokens) until the rest
arrives. A few prompt tokens seed the state so that the first output token's leading space is
decoded as it would be in context.

Stop strings are searched only in the window the new text can complete, and the output is cut
right before the stop string (or after it with ``include_stop_str_in_output``).
"""

from __future__ import annotations

from typing import Any

_PROMPT_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        if backend is not None and _has_decode_stream():
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        else:
            self._tokens: list[str] = tokenizer.convert_ids_to_tokens(context, skip_special_tokens=skip_special_tokens)
            self._prefix_offset = max(len(self._tokens) - 5, 0)
            self._read_offset = len(self._tokens)

    def step(self, token_id: int) -> str:
        """The text that ``token_id`` completes ("" while a character is still incomplete)."""
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id) or ""
            except Exception:  # an id the tokenizer does not know (random-weight models): no text
                return ""
        return self._step_offsets(token_id)

    def _step_offsets(self, token_id: int) -> str:
        tok = self.tokenizer
        new = tok.convert_ids_to_tokens([token_id], skip_special_tokens=self.skip_special_tokens)
        self._tokens.extend(t for t in new if t is not None)
        prefix_text = tok.convert_tokens_to_string(self._tokens[self._prefix_offset:self._read_offset])
        full_text = tok.convert_tokens_to_string(self._tokens[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
            return full_text[len(prefix_text):]
        return ""


_DECODE_STREAM: bool | None = None


def _has_decode_stream() -> bool:
    global _DECODE_STREAM
    if _DECODE_STREAM is None:
        try:
            from tokenizers.decoders import DecodeStream

            DecodeStream(ids=[], skip_special_tokens=True)
            _DECODE_STREAM = True
        except (ImportError, TypeError):
            _DECODE_STREAM = False
    return _DECODE_STREAM


def find_stop_string(text: str, num_new_chars: int, stop: list[str],
                     include_stop_str_in_output: bool) -> tuple[str, int] | None:
    """(stop string, where to cut ``text``) if the last ``num_new_chars`` completed a stop string."""
    if not stop or num_new_chars == 0:
        return None
    best: tuple[str, int] | None = None
    for stop_str in stop:
        start = max(0, len(text) - num_new_chars - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index >= 0 and (best is None or index < best[1]):
            best = (stop_str, index)
    if best is None:
        return None
    stop_str, index = best
    return stop_str, index + len(stop_str) if include_stop_str_in_output else index
