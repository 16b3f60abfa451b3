"""SamplingParams: how one request generates, with vLLM's names and semantics.

Bad values raise ``InvalidRequestError`` (a ``ValueError``) with a message and ``param`` naming the
field, so servers can turn it into a 400 error body as is. What needs the model (vocabulary, context
length) is checked by ``LLMEngine.add_request``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kubeinfer.engine.errors import InvalidRequestError
from kubeinfer.engine.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
_GREEDY_EPS = 1e-5
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None = until max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # vLLM's: JSON schema, regex, choice, grammar
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # sample only among these
    # Filled in by the engine: the model's EOS ids plus stop_token_ids (min_tokens suppresses them).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False, compare=False)
    # Filled in by the engine: the compiled grammar of ``structured_outputs`` (shared by the request's sequences).
    compiled_grammar: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias) or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.temperature < _GREEDY_EPS:  # greedy: the other sampling knobs do nothing
            self.temperature, self.top_p, self.top_k, self.min_p = 0.0, 1.0, 0, 0.0

    def _validate(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(message, param)

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(is_int(self.n) and self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        check(self.temperature >= 0.0, "temperature", f"temperature must be non-negative, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        check(is_int(self.top_k) and self.top_k >= 0, "top_k",
              f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty",
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
              f"max_tokens must be at least 1, got {self.max_tokens}")
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
              f"min_tokens must be at least 0, got {self.min_tokens}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
              f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        check(self.prompt_logprobs is None or (is_int(self.prompt_logprobs)
                                               and 0 <= self.prompt_logprobs <= MAX_LOGPROBS), "prompt_logprobs",
              f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",  # type: ignore[union-attr]
              "stop strings must be non-empty strings")
        check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",  # type: ignore[union-attr]
              "stop_token_ids must be non-negative integers")
        check(self.seed is None or (is_int(self.seed) and _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]), "seed",
              f"seed must be an integer in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}], got {self.seed!r}")
        for token_id, bias in (self.logit_bias or {}).items():
            check(is_int(token_id) and token_id >= 0, "logit_bias",
                  f"logit_bias keys must be token ids (non-negative integers), got {token_id!r}")
            check(isinstance(bias, int | float) and not isinstance(bias, bool) and math.isfinite(bias)
                  and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias",
                  f"logit_bias values must be in [-100, 100], got {bias!r} for token {token_id}")
        if self.allowed_token_ids is not None:
            check(bool(self.allowed_token_ids), "allowed_token_ids", "allowed_token_ids must not be empty")
            check(all(is_int(t) and t >= 0 for t in self.allowed_token_ids), "allowed_token_ids",
                  "allowed_token_ids must be non-negative integers")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs", "structured_outputs must be a StructuredOutputsParams")
        # (the grammar may allow none of the listed tokens at some step: nothing could be sampled)
        check(self.allowed_token_ids is None or self.structured_outputs is None, "allowed_token_ids",
              "allowed_token_ids cannot be combined with structured outputs (response_format, structured_outputs "
              "or a forced tool call)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)  # type: ignore[union-attr]

    def clone(self) -> SamplingParams:
        from copy import deepcopy

        return deepcopy(self)
