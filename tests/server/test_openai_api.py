"""The OpenAI protocol against a real server, with the official `openai` client and raw httpx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.helpers import API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name three colors."}]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "kubeinfer"
    assert models[0].model_extra["max_model_len"] == 1024


def test_chat_non_streaming_and_streaming_agree(any_client: openai.OpenAI) -> None:
    client = any_client  # the quantized and the dense server
    # In bf16 a prompt's logits depend (in the last bits) on how much of it the prefix cache already held,
    # and an earlier test may have cached part of this one: a first request puts both compared ones in one state.
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, temperature=0)
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_multi_turn_chat_uses_the_template(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    short = [messages[0], messages[-1]]
    one_turn = client.chat.completions.create(model=MODEL, messages=short, max_tokens=2, temperature=0)
    multi = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert multi.usage.prompt_tokens >= one_turn.usage.prompt_tokens + 6  # two more turns with headers


def test_sse_wire_format_ends_with_done(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_prompt_forms_usage_and_echo(any_client: openai.OpenAI) -> None:
    client = any_client  # the quantized and the dense server
    ids = [504, 3458, 282, 4649, 314]  # any in-vocabulary ids
    out = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 7

    batch = client.completions.create(
        model=MODEL,
        prompt=[ids, ids[:3]],
        max_tokens=3,
        n=2,
        temperature=1.0,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == len(ids) + 3 and batch.usage.completion_tokens == 4 * 3

    strings = client.completions.create(
        model=MODEL, prompt=["The sky is", "Water is"], max_tokens=3, temperature=0, echo=True
    )
    assert [c.index for c in sorted(strings.choices, key=lambda c: c.index)] == [0, 1]
    by_index = {c.index: c.text for c in strings.choices}
    assert by_index[0].startswith("The sky is") and by_index[1].startswith("Water is")


def test_n_2_gives_two_choices(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=7
    )
    assert [c.index for c in out.choices] == [0, 1]
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=7, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in out.choices}


def test_stop_strings(any_client: openai.OpenAI) -> None:
    client = any_client  # the quantized and the dense server
    args = {
        "model": MODEL,
        "prompt": "The quick brown fox",
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    text = client.completions.create(**args).choices[0].text
    assert len(text) > 8
    stop = text[5:8]
    cut = text[: text.index(stop)]
    stopped = client.completions.create(**args, stop=[stop])
    assert stopped.choices[0].text == cut
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**args, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy picks the most likely
        assert token.bytes == list(token.token.encode())


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="The cat sat on the", max_tokens=4, temperature=0, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_seed_reproduces(any_client: openai.OpenAI) -> None:
    client = any_client  # the quantized and the dense server
    def sample(seed: int) -> str:
        out = client.completions.create(
            model=MODEL, prompt="My favourite animal is", max_tokens=10, temperature=1.0, seed=seed
        )
        return out.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "no_such_field": {"x": 1}, "user": "u1"}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_api_key(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for probe in ("/health", "/ready", "/metrics"):  # probes and scrapers need no key
        assert httpx.get(f"{server.url}{probe}").status_code == 200


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": CHAT, "temperature": 5}, "temperature"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 0}, "n"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1000}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 9.0}, None),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, None),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "word " * 1100}, "prompt"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {}, "prompt"),
    ],
)
def test_invalid_requests_get_400(http: httpx.Client, path: str, body: dict, param: str | None) -> None:
    error = _error(http.post(path, json={"model": MODEL, **body}), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_prompt_longer_than_context_names_the_limit(http: httpx.Client) -> None:
    error = _error(http.post("/v1/completions", json={"prompt": "word " * 1100, "max_tokens": None}), 400)
    assert "maximum context length is 1024" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_malformed_json_gets_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    _error(response, 400)


def test_unknown_model_gets_404(client: openai.OpenAI, http: httpx.Client) -> None:
    error = _error(http.post("/v1/chat/completions", json={"model": "gpt-7", "messages": CHAT}), 404)
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-7", prompt="x", max_tokens=1)


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    assert info.value.body["param"] == "temperature"
