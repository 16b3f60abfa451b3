"""Tensor parallelism with worker processes (gloo on the CPU): the same greedy tokens as one process,
through chunked prefill, preemption and copy-on-write, and no worker left behind."""

from __future__ import annotations

import pytest
from kubeinfer.engine import LLM, SamplingParams

from tests.engine.tiny_models import make_tiny_checkpoint

PROMPTS = [[1, 5, 9, 23, 4], [7, 7, 7], list(range(3, 40)), [11, 2] * 9, [300, 301, 302, 5]]
# A KV budget small enough to preempt, and a token budget that chunks the long prompt.
TIGHT = {"dtype": "float32", "block_size": 4, "num_gpu_blocks_override": 24, "max_num_batched_tokens": 16,
         "max_model_len": 128}


def _tokens(llm: LLM, params: SamplingParams) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_two_ranks_generate_what_one_does(tmp_path, kind: str) -> None:
    path = str(make_tiny_checkpoint(kind, tmp_path / kind))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = _tokens(LLM(path, **TIGHT), params)
    llm = LLM(path, tensor_parallel_size=2, **TIGHT)
    try:
        assert _tokens(llm, params) == expected
        stats = llm.llm_engine.get_stats()
        assert stats.num_preemptions_total > 0 and stats.num_prefill_chunks_total > len(PROMPTS)
    finally:
        llm.llm_engine.shutdown()


def test_copy_on_write_reaches_every_rank(tmp_path) -> None:
    """n > 1 forks share the prompt's last block and copy it on their first write, on each rank's shard."""
    path = str(make_tiny_checkpoint("llama", tmp_path / "llama"))
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    options = {"dtype": "float32", "block_size": 4}
    expected = _tokens(LLM(path, **options), params)
    llm = LLM(path, tensor_parallel_size=2, **options)
    try:
        assert _tokens(llm, params) == expected
    finally:
        llm.llm_engine.shutdown()


def test_shutdown_stops_the_workers(tmp_path) -> None:
    llm = LLM(str(make_tiny_checkpoint("llama", tmp_path / "llama")), dtype="float32", tensor_parallel_size=2)
    processes = list(llm.llm_engine.runner.workers.processes)
    assert all(p.is_alive() for p in processes)
    llm.llm_engine.shutdown()
    assert not any(p.is_alive() for p in processes)
    llm.llm_engine.shutdown()  # twice is fine


def test_heads_that_do_not_divide_fail_clearly_and_leave_no_worker(tmp_path) -> None:
    import multiprocessing

    path = str(make_tiny_checkpoint("llama", tmp_path / "llama"))  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 3"):
        LLM(path, dtype="float32", tensor_parallel_size=3)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("kubeinfer-tp-")]
