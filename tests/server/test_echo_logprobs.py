"""`echo` with `logprobs` (prompt token logprobs), `max_tokens: 0` (score only), batched prompts, and
vLLM's `prompt_logprobs` field, against the real server with the official client and raw httpx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"
CONTEXT = [504, 3458, 282, 4649, 314, 260]  # any in-vocabulary ids
# Scores of one prompt computed in two different batches agree to bf16 noise (the server runs dtype auto).
TOL = 0.05


def _greedy_next(client: openai.OpenAI, prompt: list[int]) -> tuple[int, float]:
    """The greedy next token of `prompt` and its logprob, from a plain completion."""
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    return choice.logprobs.tokens[0], choice.logprobs.token_logprobs[0]


def test_echo_logprobs_score_the_prompt_like_lm_eval(client: openai.OpenAI) -> None:
    token_text, logprob = _greedy_next(client, CONTEXT)
    next_ids = _ids_of(client, token_text)
    assert len(next_ids) == 1
    # lm-eval's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1, temperature 0; two prompts.
    scored = [*CONTEXT, *next_ids]
    out = client.completions.create(
        model=MODEL, prompt=[scored, CONTEXT], max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    assert [c.index for c in out.choices] == [0, 1]
    lp = out.choices[0].logprobs
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == len(lp.text_offset)
        == len(scored) + 1
    )
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.tokens[len(scored) - 1] == token_text
    assert abs(lp.token_logprobs[len(scored) - 1] - logprob) < TOL  # the greedy token, scored in the prompt
    top = lp.top_logprobs[len(scored) - 1]
    assert max(top.values()) == lp.token_logprobs[len(scored) - 1]  # lm-eval's is_greedy check
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    other = out.choices[1].logprobs
    assert other.token_logprobs[1 : len(CONTEXT)] == pytest.approx(
        lp.token_logprobs[1 : len(CONTEXT)], abs=TOL
    )
    assert out.usage.prompt_tokens == len(scored) + len(CONTEXT) and out.usage.completion_tokens == 2


def _ids_of(client: openai.OpenAI, text: str) -> list[int]:
    base = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    body = httpx.post(
        f"{base}/tokenize",
        json={"prompt": text, "add_special_tokens": False},
        headers={"Authorization": f"Bearer {client.api_key}"},
    ).json()
    return body["tokens"]


def test_max_tokens_zero_with_echo_scores_only(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="The sky is blue", max_tokens=0, echo=True, logprobs=2
    )
    choice = out.choices[0]
    assert choice.text == "The sky is blue"
    assert out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == out.usage.prompt_tokens and lp.token_logprobs[0] is None
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    assert choice.finish_reason == "length"


def test_max_tokens_zero_needs_echo(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_logprobs_reassemble(client: openai.OpenAI) -> None:
    kwargs = dict(
        model=MODEL,
        prompt=["The cat sat", "Two plus two is"],
        max_tokens=4,
        temperature=0,
        logprobs=1,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kwargs)
    text: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, list[str]] = {0: [], 1: []}
    values: dict[int, list[float | None]] = {0: [], 1: []}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text[c.index] += c.text
            if c.logprobs is not None:
                tokens[c.index] += c.logprobs.tokens
                values[c.index] += c.logprobs.token_logprobs
    for c in full.choices:
        assert text[c.index] == c.text and c.text.startswith(["The cat sat", "Two plus two is"][c.index])
        assert tokens[c.index] == c.logprobs.tokens
        assert values[c.index][0] is None
        assert values[c.index][1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=TOL)


def test_vllm_prompt_logprobs_field(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "prompt_logprobs": 1,
    }
    out = http.post("/v1/chat/completions", json=body).json()
    entries = out["prompt_logprobs"]
    assert len(entries) == out["usage"]["prompt_tokens"] and entries[0] is None
    for entry in entries[1:]:
        assert 1 <= len(entry) <= 2 and all(
            set(v) >= {"logprob", "rank", "decoded_token"} for v in entry.values()
        )
    completion = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hello there", "max_tokens": 1, "prompt_logprobs": 0},
    ).json()
    entries = completion["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and all(len(e) == 1 for e in entries[1:])
    streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 400 and json.loads(streamed.text)["error"]["param"] == "prompt_logprobs"
