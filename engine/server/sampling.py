"""Turn an OpenAI request into the engine's `SamplingParams`.

Only the HTTP shape is checked here; the engine validates the values (ranges, vocabulary, context
length) once, with typed errors the routes map to 400s (see `serving.engine_error`).
"""

from __future__ import annotations

from typing import Any

from kubeinfer.engine.server.errors import bad_request
from kubeinfer.engine.server.protocol import SamplingFields


def logit_bias_ids(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's string keys as token ids (the protocol's pattern lets only digits through)."""
    if not logit_bias:
        return None
    return {int(key): value for key, value in logit_bias.items()}


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    n: int | None = None,
    structured_outputs: Any = None,
    skip_special_tokens: bool | None = None,
) -> Any:
    from kubeinfer.engine.errors import InvalidRequestError
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
        "skip_special_tokens": request.skip_special_tokens
        if skip_special_tokens is None
        else skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "structured_outputs": structured_outputs,
        "logit_bias": logit_bias_ids(request.logit_bias),
        "allowed_token_ids": request.allowed_token_ids,
    }
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        raise bad_request(exc.message, exc.param) from exc
