"""`kubeinfer serve` with the bundled GGUF kept quantized (the default) and dequantised (`--quantization none`):
the weights metric says which, and greedy answers are the same text."""

from __future__ import annotations

import openai
import pytest

from tests.server.helpers import API_KEY, ServerProcess, metric, scrape

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"


def test_weights_metric_reports_quantized_and_dense(server: ServerProcess, dense_server: ServerProcess) -> None:
    quantized = metric(scrape(server.url), "kubeinfer:model_weights_info", model_name=MODEL, quantization="gguf",
                       weight_types="Q4_1/Q8_0")
    dense = metric(scrape(dense_server.url), "kubeinfer:model_weights_info", model_name=MODEL,
                   quantization="none", weight_types="")
    assert 80e6 < quantized < 110e6  # the 98 MB file's tensors, nothing dense beside them
    assert dense > 5 * quantized


# The servers run their auto dtypes (bf16 where the CPU has fast bf16, for the kept-quantized weights where their
# kernels have bf16 dot products; else float32) around matmuls that differ in rounding: greedy picks may part at a near-tie, nowhere else.
NEAR_TIE_NATS = 0.25


def test_quantized_and_dense_servers_answer_alike(server: ServerProcess, dense_server: ServerProcess) -> None:
    steps = []
    for proc in (server, dense_server):
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        out = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, logprobs=True,
                                             top_logprobs=2,
                                             messages=[{"role": "user", "content": "Name three rivers."}])
        steps.append(out.choices[0].logprobs.content)
    quantized, dense = steps
    assert len(quantized) == len(dense) == 24
    for i, (q, d) in enumerate(zip(quantized, dense, strict=True)):
        if q.token == d.token:
            continue
        for step in (q, d):  # the two picks are each other's runner-up, within a near-tie
            top = {t.token: t.logprob for t in step.top_logprobs}
            assert {q.token, d.token} <= set(top), (i, q.token, d.token, top)
            assert abs(top[q.token] - top[d.token]) < NEAR_TIE_NATS, (i, top)
        break
