"""Recorded CPU decode steps (engine/cpu_replay.py via cuda_graphs.DecodeGraphs): a replay computes exactly
what the eager forward computes, the engine's tokens do not change, and what cannot be recorded is refused
with the reason (the engine then runs eagerly)."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from kubeinfer.engine import cpu_replay
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.cuda_graphs import DecodeGraphs
from kubeinfer.engine.layers import cpu_kernels
from kubeinfer.engine.llm_engine import LLMEngine
from kubeinfer.engine.models.loader import load_model

from tests.engine.test_engine import QUESTIONS, run_engine
from tests.engine.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs the C++ CPU kernels (a C++ compiler)")

BLOCK = 8


@pytest.fixture(scope="module")
def bundled():
    return load_model(None, dtype="float32")  # the bundled Q4_1 GGUF, kept quantized


def test_replay_equals_the_eager_forward_bit_for_bit(bundled) -> None:
    model, cfg = bundled.model, bundled.config
    shape = (64, BLOCK, model.num_kv_heads_per_rank, cfg.head_dim)
    gen = torch.Generator().manual_seed(0)
    kv = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(cfg.num_layers)]
    graphs = DecodeGraphs(lambda ids, pos, md: model(ids, pos, md, kv), device=torch.device("cpu"),
                          max_batch_size=4, max_blocks_per_seq=16, block_size=BLOCK, max_seq_len=16 * BLOCK)
    with torch.inference_mode():
        graphs.capture()
    assert set(graphs._graphs) == {1, 2, 4}
    # the quantized table's lookup is a kernel call too: nothing is re-run in Python (no eager_op step), and
    # the whole step is one native run of packed calls
    for recorded in graphs._graphs.values():
        assert all(isinstance(step, cpu_replay.KernelCall) for step in recorded.steps)
        assert len(recorded.segments) == 1 and len(recorded.segments[0].names) == len(recorded.steps)
    rng = random.Random(1)
    for batch in (1, 3, 4, 2):  # 3 replays the size-4 recording with a padding row
        graphs.input_ids[:4] = 0
        graphs.seq_lens[:4] = 0
        graphs.slot_mapping[:4] = -1
        for row in range(batch):
            length = rng.randint(1, 16 * BLOCK)
            blocks = rng.sample(range(64), -(-length // BLOCK))
            graphs.block_tables[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            graphs.seq_lens[row] = length
            graphs.positions[row] = length - 1
            graphs.slot_mapping[row] = blocks[-1] * BLOCK + (length - 1) % BLOCK
            graphs.input_ids[row] = rng.randrange(cfg.vocab_size)
        size = next(s for s in graphs.sizes if s >= batch)
        with torch.inference_mode():
            saved = [(k.clone(), v.clone()) for k, v in kv]
            eager = graphs._run_forward(size)[:batch].clone()
            eager_kv = [(k.clone(), v.clone()) for k, v in kv]
            for (k, v), (k0, v0) in zip(kv, saved, strict=True):  # the same KV writes again
                k.copy_(k0)
                v.copy_(v0)
            cpu_replay.replay(graphs._graphs[size])
            replayed = graphs._outputs[size][:batch]
        assert torch.equal(replayed, eager), (batch, (replayed - eager).abs().max())
        assert all(torch.equal(k, k1) and torch.equal(v, v1) for (k, v), (k1, v1) in zip(kv, eager_kv, strict=True))


def _engine(dtype: str = "float32", **options) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype=dtype, num_gpu_blocks_override=40, block_size=BLOCK,
                                  max_num_batched_tokens=64, **options))


def _prompts(engine: LLMEngine) -> list[list[int]]:
    tok = engine.tokenizer
    rendered = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                        return_dict=False) for q in QUESTIONS]
    return [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in rendered]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_tokens_are_the_same_replayed_or_eager(dtype: str) -> None:
    """Chunked prefill and preemption around the replayed decode steps: the same greedy tokens as eager (bf16
    activations too: the quantized kernels read and write bf16, so nothing converts in torch)."""
    outputs, replays = {}, {}
    for eager in (True, False):
        engine = _engine(dtype, enforce_eager=eager)
        outputs[eager] = run_engine(engine, _prompts(engine), [12] * len(QUESTIONS))
        graphs = engine.runner.decode_graphs
        replays[eager] = 0 if graphs is None else graphs.replays
        assert engine.get_stats().num_preemptions_total > 0
    assert outputs[False] == outputs[True]
    assert replays[True] == 0 and replays[False] > 10, replays


def test_what_cannot_be_recorded_runs_eagerly_with_the_reason(tmp_path) -> None:
    # A dense checkpoint: its linears run in torch / oneDNN.
    path = str(make_tiny_checkpoint("llama", tmp_path / "llama"))
    dense = LLMEngine(EngineConfig(model=path, dtype="float32", num_gpu_blocks_override=40, block_size=BLOCK))
    assert dense.runner.decode_graphs is None and "cannot be recorded" in dense.runner.cuda_graphs_off


def test_an_op_outside_the_kernels_is_refused_by_name() -> None:
    x = torch.ones(4)
    with pytest.raises(cpu_replay.ReplayUnsupported, match=r"aten\.add"), cpu_replay.recording():
        _ = x + 1
    with cpu_replay.recording() as rec:  # views, allocations and eager_op work are fine
        y = x.view(2, 2)
        z = cpu_replay.eager_op(lambda: y * 2)
        torch.empty(3)
    assert len(rec.steps) == 1
    x.fill_(3)
    cpu_replay.replay(rec)
    assert torch.equal(z, torch.full((2, 2), 6.0))


def _record_rms_norm(x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> cpu_replay._Recording:
    with cpu_replay.recording() as rec:
        cpu_kernels.rms_norm(x, weight, 1e-5)  # allocates its own output: record the raw call below as well
        status = cpu_kernels._lib().ki_rms_norm(cpu_kernels.DTYPE_CODES[torch.float32], x.data_ptr(), 8, None, 0,
                                                None, 0, weight.data_ptr(), out.data_ptr(), 8, 2, 8, 1e-5)
        assert status == 0
    return rec


def test_a_native_run_computes_the_calls_and_names_a_kernel_that_rejects_its_arguments() -> None:
    x, weight, out = torch.randn(2, 8), torch.rand(8) + 0.5, torch.zeros(2, 8)
    rec = _record_rms_norm(x, out, weight)
    assert len(rec.segments) == 1 and rec.segments[0].names == ["ki_rms_norm", "ki_rms_norm"]
    x.copy_(torch.randn(2, 8))  # the replay reads the new input: the recorded pointers, not copies
    cpu_replay.replay(rec)
    assert torch.allclose(out, cpu_kernels.rms_norm(x, weight, 1e-5), atol=1e-6)
    # the same program with the second call's dtype code corrupted: the kernel refuses, and the error names it
    rec.steps[1] = cpu_replay.KernelCall(rec.steps[1].name, rec.steps[1].fn, (7, *rec.steps[1].args[1:]),
                                         rec.steps[1].packed)
    rec.compile(cpu_replay._runner())
    with pytest.raises(RuntimeError, match=r"\(ki_rms_norm\) rejected"):
        cpu_replay.replay(rec)


def test_a_call_without_a_packed_entry_runs_in_python_between_native_runs() -> None:
    x, weight, out = torch.randn(2, 8), torch.rand(8) + 0.5, torch.zeros(2, 8)
    rec = _record_rms_norm(x, out, weight)
    first = rec.steps[0]
    rec.steps[0] = cpu_replay.KernelCall(first.name, first.fn, first.args, packed=None)
    rec.compile(cpu_replay._runner())
    assert rec.segments[0] is rec.steps[0] and rec.segments[1].names == ["ki_rms_norm"]
    out.zero_()
    cpu_replay.replay(rec)
    assert torch.allclose(out, cpu_kernels.rms_norm(x, weight, 1e-5), atol=1e-6)


def test_the_step_benchmark_times_the_replayed_decode_step(tmp_path, monkeypatch) -> None:
    """bench/model_step.py times decode as the engine runs it (the replay) unless told --eager."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[2] / "bench" / "model_step.py"
    spec = importlib.util.spec_from_file_location("model_step", path)
    model_step = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "model_step", model_step)  # (its dataclass looks its module up)
    spec.loader.exec_module(model_step)
    common = ["--dtype", "float32", "--batch", "2", "--context", "40", "--prefill", "0", "--steps", "2"]
    for extra, step in (([], "replay"), (["--eager"], "eager")):
        out = tmp_path / f"{step}.json"
        model_step.main([*common, *extra, "--json", str(out)])
        (row,) = json.loads(out.read_text())
        assert row["step"] == step and row["tokens_per_s"] > 0
        assert (row["attention_ms"] is None) == (step == "replay")
    out = tmp_path / "bf16-cache.json"
    model_step.main([*common, "--kv-cache-dtype", "bfloat16", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["kv_cache_dtype"] == "bfloat16" and row["dtype"] == "float32" and row["step"] == "replay"


def test_the_bandwidth_probe_counts_the_weights_as_loaded(tmp_path) -> None:
    """bench/bandwidth.py's floor for the bundled model as served: its Q4_1 layers and the Q8_0 embedding that
    is also its LM head, counted once."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bandwidth", Path(__file__).parents[2] / "bench" / "bandwidth.py")
    bandwidth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bandwidth)
    out = tmp_path / "bandwidth.json"
    bandwidth.main(["--mb", "16", "--reps", "1", "--json", str(out)])
    loaded = json.loads(out.read_text())["floors"]["as loaded"]
    assert loaded["formats"] == "Q4_1/Q8_0" and 90 < loaded["mb_per_token"] < 105
