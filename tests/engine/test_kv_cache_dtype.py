"""``--kv-cache-dtype``: the KV cache in a dtype of its own (bf16 under float32 activations on the CPU).

The kernels' own checks (RoPE + store into another dtype bit for bit, decode attention over a cache of another
dtype) are in test_cpu_kernels.py; here the engine: the cache is allocated in that dtype at half the bytes per
block, greedy decoding (chunked prefill, recorded decode steps, both attention backends) stays with the float32
cache's tokens, and a GPU refuses a cache dtype its kernels cannot read.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kubeinfer.engine.config import KV_CACHE_DTYPES, EngineConfig
from kubeinfer.engine.layers import attention
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.llm_engine import LLMEngine
from kubeinfer.engine.model_runner import ModelRunner
from kubeinfer.engine.server.cli import parse_args
from pydantic import ValidationError

from tests.engine.model_harness import generate_paged
from tests.engine.test_engine import QUESTIONS, run_engine


# float32 activations into the quantized matmuls: int8 ones (the x86 default) round the cache's differences up
# at their steps (max |logit diff| 2.1 instead of 0.19), which says nothing about the cache
def float32_activations(qtype: int, rows: int = 1) -> str:  # in place of qk.default_activations
    return "f32"


OPTIONS = dict(dtype="float32", kv_cache_memory="64MiB", block_size=8, max_num_batched_tokens=48, max_model_len=256)


def _prompts(engine: LLMEngine) -> list[list[int]]:
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS[:4]]
    return [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]


def _agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    """Tokens before each sequence's first difference, over all tokens (a sequence that parts at a near-tie
    continues differently, so later tokens say nothing)."""
    same = 0
    for r, g in zip(ref, got, strict=True):
        same += next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
    return same / sum(map(len, ref))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_cache_logits_close_to_the_float32_cache(backend: str, monkeypatch) -> None:
    """Teacher-forced on the float32 cache's greedy continuation (chunked prefill in mixed batches, the
    bundled model's float32 activations): the logits differ by what rounding K and V to bf16 moves."""
    from kubeinfer.engine.models.loader import load_model

    monkeypatch.setenv(attention.BACKEND_ENV, backend)
    monkeypatch.setattr(qk, "default_activations", float32_activations)
    loaded = load_model(None, dtype="float32")
    tok = loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS[:3]]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    ref = generate_paged(loaded.model, prompts, max_new_tokens=8, chunk=7)
    got = generate_paged(loaded.model, [s.tokens[:-1] for s in ref], max_new_tokens=1, chunk=7,
                         cache_dtype=torch.bfloat16)
    ref_logits = torch.cat([torch.stack(r.logits) for r in ref])
    got_logits = torch.cat([torch.stack(g.logits) for g in got])
    worst = float((ref_logits - got_logits).abs().max())
    agree = float((ref_logits.argmax(-1) == got_logits.argmax(-1)).float().mean())
    print(f"{backend}: max |logit diff| {worst:.3g}, top-1 agreement {agree:.1%} of {ref_logits.shape[0]}")
    assert worst < 0.5 and agree >= 0.99


@pytest.fixture(scope="module")
def float32_cache_tokens() -> list[list[int]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qk, "default_activations", float32_activations)
        engine = LLMEngine(EngineConfig(**OPTIONS))
        return run_engine(engine, _prompts(engine), [24] * 4)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_cache_keeps_the_float32_cache_greedy_tokens(float32_cache_tokens, backend: str, monkeypatch) -> None:
    monkeypatch.setenv(attention.BACKEND_ENV, backend)
    monkeypatch.setattr(qk, "default_activations", float32_activations)
    engine = LLMEngine(EngineConfig(kv_cache_dtype="bfloat16", **OPTIONS))
    runner = engine.runner
    assert runner.kv_caches[0][0].dtype == torch.bfloat16 and runner.model_config.dtype == torch.float32
    assert runner.describe()["kv_cache_dtype"] == "torch.bfloat16"
    got = run_engine(engine, _prompts(engine), [24] * 4)
    agreement = _agreement(float32_cache_tokens, got)
    print(f"{backend}: greedy tokens before the first difference {agreement:.0%}")
    assert agreement >= 0.9


def test_bf16_cache_holds_twice_the_blocks_in_the_same_budget() -> None:
    blocks = {}
    for kv in ("auto", "bfloat16"):
        engine = LLMEngine(EngineConfig(kv_cache_dtype=kv, **OPTIONS))
        blocks[kv] = engine.runner.num_blocks
        assert engine.runner.num_blocks * engine.runner.bytes_per_block <= 64 << 20
    assert blocks["bfloat16"] == 2 * blocks["auto"]


def test_a_gpu_refuses_a_cache_dtype_other_than_the_model_dtype() -> None:
    """The Triton kernels read the cache in the model's dtype: another is an error at start-up, not garbage."""
    fake = SimpleNamespace(config=EngineConfig(kv_cache_dtype="float32"),
                           model_config=SimpleNamespace(dtype=torch.bfloat16), device=torch.device("cuda"))
    with pytest.raises(ValueError, match="only the CPU kernels keep the KV cache in another dtype"):
        ModelRunner.kv_cache_dtype.fget(fake)
    fake.config = EngineConfig(kv_cache_dtype="bfloat16")
    assert ModelRunner.kv_cache_dtype.fget(fake) == torch.bfloat16
    fake.config = EngineConfig()
    assert ModelRunner.kv_cache_dtype.fget(fake) == torch.bfloat16  # auto


def test_flag_and_config_accept_the_same_values() -> None:
    for value in KV_CACHE_DTYPES:
        assert parse_args(["--kv-cache-dtype", value]).kv_cache_dtype == value
        assert EngineConfig(kv_cache_dtype=value).kv_cache_dtype == value
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "fp8"])
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
