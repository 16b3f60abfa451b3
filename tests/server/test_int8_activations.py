"""The bundled GGUF served with every default, so with int8 activations where the int8 panels run (AVX-512
VNNI; float32 elsewhere, and the tests still hold): the official openai client, streaming, logprobs, concurrent
requests across the GEMV and panel paths, and the start-up log naming the arithmetic. The shared server pins
float32 activations for its batch-composition comparisons (see conftest)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from kubeinfer.engine.layers import quant_kernels as qk

from tests.server.helpers import API_KEY, ServerProcess

pytestmark = pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build")


@pytest.fixture(scope="module")
def int8_client(int8_activation_server: ServerProcess):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=f"{int8_activation_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_start_up_log_names_the_activations(int8_activation_server: ServerProcess) -> None:
    expected = qk.default_activations(qk.Q4_1)
    assert f"Q4_1 x {expected}" in int8_activation_server.log(tail=None)


def test_chat_stream_and_logprobs(int8_client) -> None:  # type: ignore[no-untyped-def]
    question = [{"role": "user", "content": "Name three colours."}]
    # once first, so both requests below find the prompt in the prefix cache and prefill the same rows (with int8
    # activations a prefill of 3 rows and one of 20 take different paths, whose rounding may part a near-tie)
    int8_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=1)
    reply = int8_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=16,
                                                temperature=0, logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    assert choice.message.content and reply.usage.completion_tokens == len(choice.logprobs.content)
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in int8_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=question, max_tokens=16, temperature=0, stream=True)
        if chunk.choices)
    assert streamed == choice.message.content  # the same greedy decode, one request at a time


def test_concurrent_requests_all_finish(int8_client) -> None:  # type: ignore[no-untyped-def]
    """Eight at once: decode batches of 2+ rows take the int8 panel GEMM, a lone last request the 1-row path."""
    def ask(i: int) -> tuple[str, int]:
        reply = int8_client.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Count to {i + 3}:",
                                               max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        return reply.choices[0].finish_reason, reply.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert results == [("length", 24)] * 8
