"""CUDA graphs for decode steps (``engine/cuda_graphs.py``) and ``--enforce-eager``.

On the CPU: which configurations capture graphs, the capture sizes, and that ``--enforce-eager`` reaches
the model runner. The padding and static buffers are checked on the CPU by ``make gpu-check --dry-run``
(emulated graphs over the interpreted Triton kernels, tests/test_gpu_check.py); the capture itself only
on a GPU (below, and ``make gpu-check``).
"""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.cuda_graphs import capture_sizes, graphs_off_reason
from kubeinfer.engine.layers.attention import BACKEND_ENV
from kubeinfer.engine.llm_engine import LLMEngine
from kubeinfer.engine.server.cli import SERVER_ONLY, parse_args

from tests.engine.test_triton_engine import engine_prompts, greedy_reference
from tests.engine.tiny_models import make_tiny_checkpoint

CUDA = torch.device("cuda")


def test_capture_sizes_cover_every_batch_up_to_the_largest() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_graphs_only_on_one_gpu_with_the_triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    on = EngineConfig()
    assert graphs_off_reason(on, CUDA, 1) is None
    assert graphs_off_reason(EngineConfig(enforce_eager=True), CUDA, 1) == "--enforce-eager"
    assert "tensor parallelism" in graphs_off_reason(on, CUDA, 2)
    monkeypatch.setenv(BACKEND_ENV, "torch")  # plans each step from host copies of the lengths
    assert "cannot be captured" in graphs_off_reason(on, CUDA, 1)
    assert "cannot be recorded" in graphs_off_reason(on, torch.device("cpu"), 1)  # (tests/engine/test_cpu_replay.py)


def test_enforce_eager_flag_reaches_the_model_runner(tmp_path) -> None:
    args = vars(parse_args(["--enforce-eager", "--model", "unused"]))
    config = EngineConfig(**{key: value for key, value in args.items() if key not in SERVER_ONLY})
    assert config.enforce_eager is True
    assert EngineConfig(**{k: v for k, v in vars(parse_args([])).items() if k not in SERVER_ONLY}).enforce_eager is False

    path = str(make_tiny_checkpoint("llama", tmp_path / "llama"))
    runner = LLMEngine(EngineConfig(model=path, device="cpu", enforce_eager=True)).runner
    assert runner.decode_graphs is None and runner.cuda_graphs_off == "--enforce-eager"
    assert runner.describe()["cuda_graphs"] == "off (--enforce-eager)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graph capture")
def test_decode_graphs_match_eager_and_transformers_on_cuda(tmp_path) -> None:
    """Greedy fp32 tokens under KV pressure (chunking, preemption, prefix hits): graphs replayed, same tokens."""
    path = str(make_tiny_checkpoint("llama", tmp_path / "llama"))
    prompts = engine_prompts()
    expected = greedy_reference(path, prompts, 10)
    from kubeinfer.engine import SamplingParams

    results = {}
    for eager in (False, True):
        engine = LLMEngine(EngineConfig(model=path, dtype="float32", device="cuda", block_size=8,
                                        num_gpu_blocks_override=14, max_num_batched_tokens=24, enforce_eager=eager))
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        tokens = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
        results[eager] = [tokens[f"r{i}"] for i in range(len(prompts))]
        graphs = engine.runner.decode_graphs
        assert (graphs is None) == eager
        if graphs is not None:
            assert graphs.replays > 0, "no decode step replayed a graph"
    assert results[False] == results[True] == expected
