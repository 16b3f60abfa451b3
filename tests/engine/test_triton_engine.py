"""The Triton attention backend inside the real engine, on the CPU through Triton's interpreter.

``KUBEINFER_ATTENTION_BACKEND=triton`` makes every Attention layer use the Triton kernels; the
engine then runs a batch whose small KV budget and step budget force chunked prefill, mixed
prefill/decode steps, preemption and prefix-cache hits, and its greedy tokens must equal
transformers' (fp32). This checks the backend against the metadata the model runner really builds.
With a CUDA GPU the interpreted check runs compiled on it instead (``compiled_mode``).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from tests.engine.test_triton_attention import in_interpreter, interpreter_pool, kernel_device
from tests.engine.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield pool


def greedy_reference(path: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, pad_token_id=0
        )
        results.append(out[0, len(prompt) :].tolist())
    return results


def check_engine_greedy(backend, path: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Runs in the interpreter worker (compiled mode: here, on the GPU): the engine with the Triton
    backend, under KV pressure."""
    previous = os.environ.get("KUBEINFER_ATTENTION_BACKEND")
    os.environ["KUBEINFER_ATTENTION_BACKEND"] = "triton"
    try:
        return run_engine(backend, path, prompts, max_new, device=kernel_device())
    finally:
        if previous is None:
            os.environ.pop("KUBEINFER_ATTENTION_BACKEND", None)
        else:
            os.environ["KUBEINFER_ATTENTION_BACKEND"] = previous


def run_engine(backend, path: str, prompts: list[list[int]], max_new: int, device: str) -> list[list[int]]:
    from kubeinfer.engine import SamplingParams
    from kubeinfer.engine.config import EngineConfig
    from kubeinfer.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=path,
            dtype="float32",
            device=device,
            block_size=8,
            num_gpu_blocks_override=14,
            max_num_batched_tokens=24,
        )
    )
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)

    backends = {m._backend for m in engine.runner.model.modules() if hasattr(m, "_backend")}
    assert backends == {backend}, f"attention ran on {backends}, not the Triton backend"
    stats = engine.get_stats()
    assert stats.num_preemptions_total > 0, "the KV budget was meant to force preemption"
    assert stats.prefix_cache_hits_total > 0, "the repeated prompt was meant to hit the prefix cache"
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def engine_prompts() -> list[list[int]]:
    """A shared prefix (prefix cache), a repeat, lengths from 1 to 30 (chunking under a 24-token budget)."""
    rng = random.Random(7)
    shared = [rng.randrange(256) for _ in range(17)]
    prompts = [
        [*shared, 5, 9],
        [rng.randrange(256) for _ in range(30)],
        [42],
        [*shared, 77, 3, 1],
        [11, 12, 13],
    ]
    prompts.append(list(prompts[1]))
    return prompts


def test_tiny_llama_greedy_matches_transformers(interp, tmp_path):
    path = str(make_tiny_checkpoint("llama", tmp_path / "llama"))
    prompts = engine_prompts()
    max_new = 10
    expected = greedy_reference(path, prompts, max_new)
    got = in_interpreter(interp, check_engine_greedy, path, prompts, max_new)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} (len {len(prompts[i])}) diverged from transformers"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled Triton kernels")
def test_tiny_llama_on_cuda_greedy_matches_transformers(tmp_path, monkeypatch):
    """The same run with compiled kernels on the GPU (fp32, so greedy tokens must match exactly)."""
    from kubeinfer.engine.layers import triton_attention

    monkeypatch.setenv("KUBEINFER_ATTENTION_BACKEND", "triton")
    path = str(make_tiny_checkpoint("llama", tmp_path / "llama"))
    prompts = engine_prompts()
    expected = greedy_reference(path, prompts, 10)
    got = run_engine(triton_attention, path, prompts, 10, device="cuda")
    assert got == expected
