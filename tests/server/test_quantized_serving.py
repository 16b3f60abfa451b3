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


def test_quantized_and_dense_servers_answer_alike(server: ServerProcess, dense_server: ServerProcess) -> None:
    answers = []
    for proc in (server, dense_server):
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        out = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24,
                                             messages=[{"role": "user", "content": "Name three rivers."}])
        answers.append(out.choices[0].message.content)
    assert answers[0] == answers[1]
