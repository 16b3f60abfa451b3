"""Every sampling field through the real server (official `openai` client), alone and mixed in one busy
batch with plain requests: penalties no longer fail the step (issue 9 item 1), an innocent concurrent
stream always completes, and logit_bias / allowed_token_ids are honoured and validated (issue 10)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.server.helpers import bundled_tokenizer

pytestmark = pytest.mark.timeout(600)

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The best way to learn a new language is"
CHAT = [{"role": "user", "content": "Write two sentences about the sea."}]
IM_END = 2  # SmolLM2's <|im_end|>


def complete(client: openai.OpenAI, **kwargs: Any) -> Any:
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in EXTRA_FIELDS}
    return client.completions.create(model=MODEL, prompt=kwargs.pop("prompt", PROMPT), extra_body=extra or None,
                                     **{"max_tokens": 24, **kwargs})


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in EXTRA_FIELDS}
    return client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", CHAT),
                                          extra_body=extra or None, **{"max_tokens": 24, **kwargs})


EXTRA_FIELDS = {"top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
                "allowed_token_ids", "skip_special_tokens", "include_stop_str_in_output"}


class InnocentStream:
    """A plain streamed chat that runs while the others do; it must end normally, every token there."""

    def __init__(self, client: openai.OpenAI, max_tokens: int = 64) -> None:
        self.max_tokens = max_tokens
        self.chunks: list[Any] = []
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client,), daemon=True)

    def _run(self, client: openai.OpenAI) -> None:
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=self.max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            for chunk in stream:
                self.chunks.append(chunk)
                if len(self.chunks) >= 3:
                    self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()

    def __enter__(self) -> InnocentStream:
        self._thread.start()
        assert self.started.wait(120)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(300)

    def check(self) -> None:
        assert self.error is None, repr(self.error)
        finishes = [c.choices[0].finish_reason for c in self.chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        assert self.chunks[-1].usage is not None and self.chunks[-1].usage.completion_tokens == self.max_tokens


def test_penalties_in_a_busy_batch_fail_nobody(client: openai.OpenAI) -> None:
    """Issue 9 item 1: a penalty raised in the engine step and failed every request in it (503)."""
    with InnocentStream(client) as innocent, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(chat, client, presence_penalty=1.0),
                   pool.submit(chat, client, frequency_penalty=0.8, stream=False),
                   pool.submit(chat, client, repetition_penalty=1.2),
                   pool.submit(complete, client, presence_penalty=-0.5, frequency_penalty=0.3),
                   pool.submit(complete, client, repetition_penalty=1.1, temperature=0.9, seed=5),
                   pool.submit(chat, client, repetition_penalty=1.3, n=2, temperature=1.0)]
        results = [f.result() for f in futures]
    innocent.check()
    for r in results:
        assert r.usage.completion_tokens > 0 and all(c.finish_reason in ("stop", "length") for c in r.choices)


def text_of(response: Any) -> str:
    choice = response.choices[0]
    return choice.message.content if hasattr(choice, "message") else choice.text


def greedy(client: openai.OpenAI, **kwargs: Any) -> Any:
    return complete(client, temperature=0, ignore_eos=True, **kwargs)


@functools.cache
def token_text(client: openai.OpenAI, token_id: int) -> str:
    """The text of one token, asked of the server (logit_bias forces it, logprobs name it)."""
    r = complete(client, max_tokens=1, temperature=0, logit_bias={str(token_id): 100}, logprobs=0,
                 skip_special_tokens=False)
    return r.choices[0].logprobs.tokens[0]


# Each case: (name, request maker, check of the response). The checks compare with greedy where the
# field's meaning allows an exact answer.
Case = tuple[str, Callable[[openai.OpenAI], Any], Callable[[openai.OpenAI, Any], None]]


@functools.cache
def greedy_default(client: openai.OpenAI) -> str:
    return text_of(greedy(client))


def _same_as_greedy(client: openai.OpenAI, response: Any) -> None:
    assert text_of(response) == greedy_default(client)


def _only_top_tokens(client: openai.OpenAI, response: Any) -> None:
    """top_k=1 and min_p=1 keep only the most likely tokens: each one drawn is a top-1 (ties with the argmax
    stay in, as in vLLM, which is why this is not compared with greedy text: bf16 logits tie often)."""
    logprobs = response.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 24
    for sampled, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert sampled == max(top.values()), (sampled, top)


def _check_seed(client: openai.OpenAI, response: Any) -> None:
    again = complete(client, temperature=1.0, seed=1234, ignore_eos=True)
    assert text_of(again) == text_of(response)


def _check_n(client: openai.OpenAI, response: Any) -> None:
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert len({c.text for c in response.choices}) > 1


def _check_penalty(client: openai.OpenAI, response: Any) -> None:
    plain = greedy(client, max_tokens=48)
    assert text_of(response) != text_of(plain)  # greedy SmolLM2 repeats itself; the penalty must bite


def _check_min_tokens(client: openai.OpenAI, response: Any) -> None:
    # EOS is pushed to the top: without min_tokens it ends at once, with min_tokens=5 the 6th token ends it.
    assert response.usage.completion_tokens == 6 and response.choices[0].finish_reason == "stop"
    plain = chat(client, temperature=0, max_tokens=60, logit_bias={str(IM_END): 100})
    assert plain.usage.completion_tokens == 1 and plain.choices[0].finish_reason == "stop"


@functools.cache
def greedy_text(client: openai.OpenAI) -> str:
    return text_of(greedy(client, max_tokens=48))


@functools.cache
def stop_word(client: openai.OpenAI) -> str:
    return greedy_text(client).split()[3]


def _check_stop(client: openai.OpenAI, response: Any) -> None:
    full, word = greedy_text(client), stop_word(client)
    assert response.choices[0].finish_reason == "stop" and response.choices[0].stop_reason == word
    assert text_of(response) == full[: full.index(word)]


def _check_include_stop(client: openai.OpenAI, response: Any) -> None:
    assert response.choices[0].finish_reason == "stop" and text_of(response).endswith("e")
    assert greedy_text(client).startswith(text_of(response))


@functools.cache
def greedy_token_ids(client: openai.OpenAI) -> list[int]:
    """The first greedy tokens' ids (texts from the server's logprobs, ids from the tokenizer, checked)."""
    r = complete(client, max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
    return [find_id(client, text) for text in r.choices[0].logprobs.tokens]


def find_id(client: openai.OpenAI, text: str) -> int:
    ids = bundled_tokenizer().encode(text, add_special_tokens=False)
    assert len(ids) == 1 and token_text(client, ids[0]) == text
    return ids[0]


def _check_stop_token_ids(client: openai.OpenAI, response: Any) -> None:
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == greedy_token_ids(client)[2]
    assert response.usage.completion_tokens == 3


def _check_ignore_eos(client: openai.OpenAI, response: Any) -> None:
    assert response.usage.completion_tokens == 40 and response.choices[0].finish_reason == "length"


def _check_logprobs(client: openai.OpenAI, response: Any) -> None:
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy: the sampled token ranks first


def _check_completion_logprobs(client: openai.OpenAI, response: Any) -> None:
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == response.usage.completion_tokens
    assert all(len(top) >= 2 for top in lp.top_logprobs)


def _check_logit_bias_up(client: openai.OpenAI, response: Any) -> None:
    assert text_of(response) == token_text(client, 1000) * 8


def _check_logit_bias_down(client: openai.OpenAI, response: Any) -> None:
    first = token_text(client, greedy_token_ids(client)[0])
    assert response.choices[0].logprobs.tokens[0] != first


def _check_allowed(client: openai.OpenAI, response: Any) -> None:
    allowed = {token_text(client, t) for t in (1000, 2000, 3000)}
    tokens = response.choices[0].logprobs.tokens
    assert len(tokens) == 12 and set(tokens) <= allowed and len(set(tokens)) > 1


def _check_max_tokens(client: openai.OpenAI, response: Any) -> None:
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


def _check_special_kept(client: openai.OpenAI, response: Any) -> None:
    assert text_of(response) == "<|im_end|>" * 3


def _check_special_skipped(client: openai.OpenAI, response: Any) -> None:
    assert text_of(response) == "" and response.usage.completion_tokens == 3


CASES: list[Case] = [
    ("temperature", lambda c: complete(c, temperature=0, ignore_eos=True), _same_as_greedy),
    ("top_p", lambda c: complete(c, temperature=1.0, top_p=1e-6, ignore_eos=True), _same_as_greedy),
    ("top_k", lambda c: complete(c, temperature=1.5, top_k=1, ignore_eos=True, logprobs=1), _only_top_tokens),
    ("min_p", lambda c: complete(c, temperature=1.0, min_p=1.0, ignore_eos=True, logprobs=1), _only_top_tokens),
    ("seed", lambda c: complete(c, temperature=1.0, seed=1234, ignore_eos=True), _check_seed),
    ("n", lambda c: complete(c, temperature=1.0, n=3, ignore_eos=True), _check_n),
    ("presence_penalty", lambda c: greedy(c, max_tokens=48, presence_penalty=2.0), _check_penalty),
    ("frequency_penalty", lambda c: greedy(c, max_tokens=48, frequency_penalty=2.0), _check_penalty),
    ("repetition_penalty", lambda c: greedy(c, max_tokens=48, repetition_penalty=2.0), _check_penalty),
    ("min_tokens", lambda c: chat(c, temperature=0, max_tokens=60, min_tokens=5, logit_bias={str(IM_END): 100}),
     _check_min_tokens),
    ("stop", lambda c: greedy(c, max_tokens=48, stop=[stop_word(c)]), _check_stop),
    ("include_stop_str_in_output", lambda c: greedy(c, max_tokens=48, stop=["e"], include_stop_str_in_output=True),
     _check_include_stop),
    ("stop_token_ids", lambda c: complete(c, temperature=0, max_tokens=24,
                                          stop_token_ids=[greedy_token_ids(c)[2]]), _check_stop_token_ids),
    ("ignore_eos", lambda c: chat(c, temperature=0, max_tokens=40, ignore_eos=True,
                                  messages=[{"role": "user", "content": "Say yes."}]), _check_ignore_eos),
    ("logprobs", lambda c: chat(c, temperature=0, logprobs=True, top_logprobs=3), _check_logprobs),
    ("completion_logprobs", lambda c: complete(c, temperature=0.7, seed=3, logprobs=2), _check_completion_logprobs),
    ("logit_bias", lambda c: complete(c, temperature=0, max_tokens=8, ignore_eos=True,
                                      logit_bias={"1000": 100}), _check_logit_bias_up),
    ("logit_bias_down", lambda c: complete(c, temperature=0, max_tokens=1, logprobs=0,
                                           logit_bias={str(greedy_token_ids(c)[0]): -100}), _check_logit_bias_down),
    ("allowed_token_ids", lambda c: complete(c, temperature=1.5, seed=9, max_tokens=12, ignore_eos=True, logprobs=0,
                                             allowed_token_ids=[1000, 2000, 3000]), _check_allowed),
    ("max_tokens", lambda c: chat(c, max_tokens=5, ignore_eos=True), _check_max_tokens),
    ("skip_special_tokens", lambda c: complete(c, max_tokens=3, ignore_eos=True, allowed_token_ids=[IM_END],
                                               skip_special_tokens=False), _check_special_kept),
    ("skip_special_tokens_default", lambda c: complete(c, max_tokens=3, ignore_eos=True,
                                                       allowed_token_ids=[IM_END]), _check_special_skipped),
]


@pytest.mark.parametrize(("name", "make", "check"), CASES, ids=[c[0] for c in CASES])
def test_each_sampling_field_alone(client: openai.OpenAI, name: str, make, check) -> None:  # type: ignore[no-untyped-def]
    check(client, make(client))


@pytest.mark.timeout(1800)  # ~40 requests through a 135M model on a shared CPU
def test_every_field_mixed_in_one_batch_with_plain_requests(client: openai.OpenAI) -> None:
    """All the cases at once (plus two plain streams and plain requests): each still checks out."""
    client = client.with_options(timeout=900)  # ~30 requests queue behind max_num_seqs=8 on a loaded CPU
    greedy_token_ids(client), stop_word(client), greedy_default(client)  # the helpers' answers, before the burst
    for token_id in (1000, 2000, 3000):
        token_text(client, token_id)
    with (InnocentStream(client) as first, InnocentStream(client, max_tokens=48) as second,
          ThreadPoolExecutor(len(CASES) + 4) as pool):
        futures = {name: pool.submit(make, client) for name, make, _ in CASES}
        plain = [pool.submit(chat, client, temperature=0) for _ in range(4)]
        responses = {name: f.result() for name, f in futures.items()}
        plain_texts = [text_of(f.result()) for f in plain]
    first.check()
    second.check()
    assert len(set(plain_texts)) == 1
    for name, _, check in CASES:
        check(client, responses[name])


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"-3": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"49152": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": CHAT, "allowed_token_ids": [1, 49152]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 30, "max_tokens": 5}, "min_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1100}]}, "messages"),
    ("/v1/completions", {"prompt": [5, 10**7]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 9}, "n"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [2, 49152]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": CHAT, "stop_token_ids": [10**9]}, "stop_token_ids"),
])
def test_bad_sampling_values_get_400_naming_the_field(http: httpx.Client, path: str, body: dict, param: str) -> None:
    response = http.post(path, json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param or error["param"].startswith(f"{param}."), error  # logit_bias.five: the key
    assert error["type"] == "invalid_request_error" and error["message"]
