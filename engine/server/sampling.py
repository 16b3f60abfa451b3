"""Turn an OpenAI request into the engine's `SamplingParams`, checking the context length first."""

from __future__ import annotations

from typing import Any

from kubeinfer.engine.server.errors import OpenAIError, bad_request
from kubeinfer.engine.server.protocol import SamplingFields


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, prompt_param: str = "messages"
) -> int:
    """vLLM's rule: prompt + completion must fit the context; no max_tokens means "the rest of it"."""
    room = max_model_len - prompt_len
    if requested is None:
        if room <= 0:
            raise _too_long(prompt_len, max_model_len, None, prompt_param)
        return room
    if requested > room:
        raise _too_long(prompt_len, max_model_len, requested, prompt_param)
    return requested


def _too_long(prompt_len: int, max_model_len: int, requested: int | None, prompt_param: str) -> OpenAIError:
    asked = prompt_len + (requested or 0)
    detail = f"{prompt_len} in the prompt" + (f", {requested} in the completion" if requested else "")
    return OpenAIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{asked} tokens ({detail}). Please reduce the length of the prompt or the completion.",
        param=prompt_param if requested is None else "max_tokens",
        code="context_length_exceeded",
    )


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    n: int | None = None,
) -> Any:
    from kubeinfer.engine.sampling_params import SamplingParams

    kwargs: dict[str, Any] = {
        "n": n if n is not None else request.n,
        "max_tokens": max_tokens,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "seed": request.seed,
        "stop": request.stop_list(),
        "stop_token_ids": list(request.stop_token_ids or []),
        "ignore_eos": request.ignore_eos,
        "min_tokens": request.min_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "skip_special_tokens": request.skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
    }
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if kwargs["min_tokens"] > max_tokens:
        raise bad_request(
            f"min_tokens ({request.min_tokens}) must be at most max_tokens ({max_tokens})", "min_tokens"
        )
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"invalid sampling parameters: {exc}") from exc
