"""`/metrics`: vLLM's names and labels, values that follow the requests, blocks freed on disconnect."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.helpers import ServerProcess, metric, scrape, wait_for

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"
NAMES = [
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
    "vllm:time_to_first_token_seconds_count",
    "vllm:time_per_output_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:request_time_per_output_token_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:request_success_total",
]


def test_metric_names_and_model_label(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="warm up", max_tokens=2)
    samples = scrape(server.url)
    for name in NAMES:
        assert metric(samples, name, model_name=MODEL) >= 0, name
    engine_samples = [key for key in samples if not key.startswith("process_")]
    assert all('model_name="' in key for key in engine_samples), [k for k in engine_samples if "model_name" not in k]
    assert samples["process_resident_memory_bytes"] > 50 << 20  # the process collector, as vLLM's registry has
    assert metric(samples, "vllm:cache_config_info", block_size="16", cache_dtype="auto") == 1.0
    blocks = next(key for key in samples if key.startswith("vllm:cache_config_info"))
    assert 'num_gpu_blocks="' in blocks and 'num_gpu_blocks="0"' not in blocks
    buckets = [k for k in samples if k.startswith("vllm:time_to_first_token_seconds_bucket")]
    assert any('le="0.001"' in k for k in buckets) and any('le="2560.0"' in k for k in buckets)


def test_counters_follow_requests_exactly(server: ServerProcess, client: openai.OpenAI) -> None:
    before = scrape(server.url)
    out = client.completions.create(
        model=MODEL, prompt=[1, 2, 3, 4, 5, 6], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        try:
            old = metric(before, name, model_name=MODEL, **labels)
        except KeyError:
            old = 0.0
        return metric(after, name, model_name=MODEL, **labels) - old

    assert delta("vllm:prompt_tokens_total") == out.usage.prompt_tokens == 6
    assert delta("vllm:generation_tokens_total") == out.usage.completion_tokens == 5
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:time_per_output_token_seconds_count") == 4  # the tokens after the first
    assert delta("vllm:inter_token_latency_seconds_count") == 4
    assert delta("vllm:inter_token_latency_seconds_sum") == pytest.approx(
        delta("vllm:time_per_output_token_seconds_sum")
    )
    assert delta("vllm:request_time_per_output_token_seconds_count") == 1  # one per request
    assert 0 < delta("vllm:request_time_per_output_token_seconds_sum") <= delta(
        "vllm:e2e_request_latency_seconds_sum"
    )
    assert delta("vllm:prefix_cache_queries_total") >= 6
    assert metric(after, "vllm:num_requests_running", model_name=MODEL) == 0
    assert metric(after, "vllm:num_requests_waiting", model_name=MODEL) == 0


def _idle(url: str) -> bool:
    samples = scrape(url)
    return (
        metric(samples, "vllm:num_requests_running", model_name=MODEL) == 0
        and metric(samples, "vllm:num_requests_waiting", model_name=MODEL) == 0
        and metric(samples, "vllm:kv_cache_usage_perc", model_name=MODEL) == 0.0
    )


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_disconnect_mid_stream_aborts_and_frees_blocks(
    server: ServerProcess, http: httpx.Client, endpoint: str
) -> None:
    wait_for(lambda: _idle(server.url))
    aborted_before = _aborted(server.url)
    # logprobs: one event per token, even for tokens without text
    body = {"model": MODEL, "max_tokens": 500, "ignore_eos": True, "stream": True}
    body |= (
        {"messages": [{"role": "user", "content": "Tell me a story."}], "logprobs": True}
        if "chat" in endpoint
        else {"prompt": "Tell me a long story about a dragon.", "logprobs": 1}
    )
    with http.stream("POST", endpoint, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = 0
        for line in lines:
            received += line.startswith("data: ")
            if received >= 3:
                break
        samples = scrape(server.url)
        assert metric(samples, "vllm:num_requests_running", model_name=MODEL) == 1
        assert metric(samples, "vllm:kv_cache_usage_perc", model_name=MODEL) > 0
    # The client is gone: the request must be aborted (not run to 500 tokens) and its blocks freed.
    wait_for(lambda: _idle(server.url), timeout=15)
    assert _aborted(server.url) == aborted_before + 1


def _aborted(url: str) -> float:
    try:
        return metric(scrape(url), "vllm:request_success_total", model_name=MODEL, finished_reason="abort")
    except KeyError:
        return 0.0


def test_disconnect_while_waiting_for_a_non_streaming_answer(
    server: ServerProcess, http: httpx.Client
) -> None:
    wait_for(lambda: _idle(server.url))
    aborted_before = _aborted(server.url)
    body = {"model": MODEL, "prompt": "Count to one thousand:", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=httpx.Timeout(120, read=2.0))
    wait_for(lambda: _idle(server.url), timeout=15)
    assert _aborted(server.url) == aborted_before + 1
