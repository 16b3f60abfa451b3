"""The engine end to end: greedy tokens identical to transformers (fp32), alone and in one mixed batch
whose KV budget is small enough to force chunked prefill and preemption; block accounting after."""

from __future__ import annotations

import random

import pytest
import torch
from kubeinfer.engine import LLM, SamplingParams
from kubeinfer.engine.llm_engine import LLMEngine
from transformers import AutoModelForCausalLM

from tests.engine.tiny_models import TINY_KINDS, make_tiny_checkpoint

# The bundled GGUF is compared with transformers on its dequantised weights: the quantized kernels multiply
# float32 activations here (int8 ones are bounded in test_quantized_model.py).
pytestmark = pytest.mark.usefixtures("float32_activations")

BATCH = 18
MAX_NEW = 12


def assert_blocks_released(engine: LLMEngine) -> None:
    """Every block is free again; the only ones with content left are prefix-cache entries."""
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert engine.get_stats().kv_cache_usage == 0.0


def hf_greedy(hf: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def mixed_prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    """Mixed lengths (1..60), a shared prefix for some, one exact repeat: prefix cache in play too."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(20)]
    prompts = []
    for i in range(count):
        tail = [rng.randrange(vocab) for _ in range(rng.choice([1, 3, 7, 12, 25, 40, 60]))]
        prompts.append(shared + tail[:10] if i % 4 == 0 else tail)
    prompts[-1] = list(prompts[1])
    return prompts


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_new: list[int]) -> list[list[int]]:
    for i, (prompt, n) in enumerate(zip(prompts, max_new, strict=True)):
        engine.add_request(f"req-{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    results: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
                assert out.outputs[0].finish_reason == "length"
    return [results[f"req-{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(make_tiny_checkpoint(kind, root / kind)) for kind in TINY_KINDS}


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_model_matches_transformers_alone_and_in_pressured_batch(kind: str, tiny_dirs) -> None:
    path = tiny_dirs[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = mixed_prompts(256, BATCH, seed=hash(kind) % 1000)
    max_new = [MAX_NEW + (i % 3) * 4 for i in range(BATCH)]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, max_new, strict=True)]

    # 8-token blocks; 30 blocks hold ~3 of the longest requests; a 32-token step budget.
    engine = LLMEngine_for(path, num_gpu_blocks_override=30, block_size=8, max_num_batched_tokens=32)
    for i in (0, 5):  # alone
        assert run_engine(engine, [prompts[i]], [max_new[i]]) == [expected[i]]
    assert_blocks_released(engine)

    before = engine.get_stats()
    got = run_engine(engine, prompts, max_new)
    stats = engine.get_stats()
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} (len {len(prompts[i])}) diverged"
    assert stats.num_preemptions_total > before.num_preemptions_total
    assert stats.num_prefill_chunks_total > before.num_prefill_chunks_total
    assert stats.prefix_cache_hits_total > before.prefix_cache_hits_total
    assert_blocks_released(engine)


def LLMEngine_for(path: str | None, **options) -> LLMEngine:
    from kubeinfer.engine.config import EngineConfig

    return LLMEngine(EngineConfig(model=path, dtype="float32", **options))


@pytest.fixture(scope="module")
def smollm_hf():
    from kubeinfer.engine.models.bundled import bundled_model_path

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm_llm() -> LLM:
    return LLM(dtype="float32", num_gpu_blocks_override=40, block_size=8, max_num_batched_tokens=64)


QUESTIONS = ["What is 2+2?", "Name a colour.", "Write a haiku about the sea.", "Who wrote Hamlet?",
             "Explain gravity in one sentence.", "Translate 'cat' to French.", "List three fruits.",
             "What is the capital of Japan?", "Say hello.", "Why is the sky blue?", "Count to five.",
             "What is Python?", "Give me a synonym for happy.", "How many legs does a spider have?",
             "What is the boiling point of water?", "Tell me a joke."]


def test_smollm2_matches_transformers_alone_and_in_pressured_batch(smollm_llm: LLM, smollm_hf) -> None:
    engine = smollm_llm.llm_engine
    tok = smollm_llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    max_new = [6 + (i % 3) * 2 for i in range(len(prompts))]
    expected = [hf_greedy(smollm_hf, p, n) for p, n in zip(prompts, max_new, strict=True)]

    assert run_engine(engine, [prompts[2]], [max_new[2]]) == [expected[2]]
    before = engine.get_stats()
    got = run_engine(engine, prompts, max_new)
    stats = engine.get_stats()
    assert got == expected
    assert stats.num_preemptions_total > before.num_preemptions_total
    assert stats.num_prefill_chunks_total > before.num_prefill_chunks_total
    assert_blocks_released(engine)


def test_smollm2_chat_and_repeated_prompt_hits_prefix_cache(smollm_llm: LLM) -> None:
    engine = smollm_llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=10)
    first = smollm_llm.chat([{"role": "user", "content": "What is the capital of France?"}], params)[0]
    assert "Paris" in first.outputs[0].text
    assert first.prompt is not None and first.prompt.startswith("<|im_start|>")
    hits = engine.get_stats().prefix_cache_hits_total
    again = smollm_llm.chat([{"role": "user", "content": "What is the capital of France?"}], params)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens > 0
    assert engine.get_stats().prefix_cache_hits_total - hits >= len(first.prompt_token_ids) // 8 * 8 - 8
    assert_blocks_released(engine)
