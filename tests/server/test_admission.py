"""Admission control: a full waiting queue answers 429, and `num_requests_waiting` is exact under load."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server.helpers import ServerProcess, metric, scrape, wait_for

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"
MAX_WAITING = 2
NUM_BLOCKS = 40  # 640 tokens of KV cache: a 900-token request can never fit


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One sequence at a time, at most MAX_WAITING waiting, a tiny KV cache; set by KUBEINFER_* variables."""
    proc = ServerProcess(
        [],
        env={
            "KUBEINFER_MAX_NUM_SEQS": "1",
            "KUBEINFER_MAX_WAITING_REQUESTS": str(MAX_WAITING),
            "KUBEINFER_ENABLE_PREFIX_CACHING": "false",
            "KUBEINFER_NUM_GPU_BLOCKS_OVERRIDE": str(NUM_BLOCKS),
        },
    )
    proc.start(tmp_path_factory.mktemp("tight")).wait_ready()
    yield proc
    proc.stop()


def _gauges(url: str) -> tuple[float, float]:
    samples = scrape(url)
    return (
        metric(samples, "vllm:num_requests_running", model_name=MODEL),
        metric(samples, "vllm:num_requests_waiting", model_name=MODEL),
    )


def _slow_stream(stack: contextlib.ExitStack, http: httpx.Client) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write an essay."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    response = stack.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
    assert response.status_code == 200
    return response


def test_full_queue_answers_429_and_waiting_is_exact(tight_server: ServerProcess) -> None:
    url = tight_server.url
    assert _gauges(url) == (0, 0)
    info = {"enable_prefix_caching": "False", "num_gpu_blocks": str(NUM_BLOCKS), "block_size": "16"}
    assert metric(scrape(url), "vllm:cache_config_info", **info) == 1
    with httpx.Client(base_url=url, timeout=60) as http, contextlib.ExitStack() as stack:
        _slow_stream(stack, http)
        wait_for(lambda: _gauges(url) == (1, 0))
        for waiting in range(1, MAX_WAITING + 1):
            _slow_stream(stack, http)
            assert _gauges(url) == (1, waiting)  # exact right after the request is accepted
        refused = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        )
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        for _ in range(3):  # the gauge stays exact while nothing changes
            assert _gauges(url) == (1, MAX_WAITING)
    # All clients closed their streams: everything is aborted and freed.
    wait_for(lambda: _gauges(url) == (0, 0), timeout=15)
    assert metric(scrape(url), "vllm:kv_cache_usage_perc", model_name=MODEL) == 0.0
    ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusal_is_a_400_even_when_streaming(tight_server: ServerProcess, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 900, "stream": stream}
    response = httpx.post(f"{tight_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert "KV cache blocks" in response.json()["error"]["message"]
    assert _gauges(tight_server.url) == (0, 0)
