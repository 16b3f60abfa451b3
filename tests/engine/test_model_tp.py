"""Tensor parallelism on the CPU: 2 gloo processes give the same logits as one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kubeinfer.engine.models.loader import load_model

from tests.engine.model_harness import generate_paged
from tests.engine.tiny_models import make_tiny_checkpoint

KINDS = ("llama_bias", "qwen2", "qwen3")  # row-parallel biases, tied sharded vocab, q/k norm
PROMPTS = [[5, 77, 200, 31, 9, 140, 66], [250, 3, 18]]


def _run(path: str, tp_rank: int = 0, tp_size: int = 1, quantization: str | None = None
         ) -> tuple[list[torch.Tensor], list[list[int]]]:
    loaded = load_model(path, dtype="float32", tp_rank=tp_rank, tp_size=tp_size, quantization=quantization)
    seqs = generate_paged(loaded.model, PROMPTS, max_new_tokens=4, chunk=4)
    return [torch.stack(s.logits) for s in seqs], [s.generated for s in seqs]


def _worker(rank: int, paths: list[str], init_file: str, out: str, quantization: str | None = None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        results = {path: _run(path, rank, 2, quantization) for path in paths}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    # Skip the C++ static destructors: at exit they sometimes abort a process that used gloo and OpenMP
    # ("terminate called without an active exception"), after the results are safely written.
    os._exit(0)


@pytest.mark.timeout(300)
def test_tp2_matches_single_process(tmp_path) -> None:
    paths = [str(make_tiny_checkpoint(kind, tmp_path / kind)) for kind in KINDS]
    out = str(tmp_path / "result")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(paths, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        results = torch.load(f"{out}.{rank}")
        for path in paths:
            ref_logits, ref_tokens = _run(path)
            logits, tokens = results[path]
            assert tokens == ref_tokens, path
            for got, want in zip(logits, ref_logits, strict=True):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(300)
def test_tp2_int8_matches_single_process(tmp_path) -> None:
    """Quantized weights shard like dense ones: int8 rows (scales over the full row) split across 2 ranks."""
    paths = [str(make_tiny_checkpoint(kind, tmp_path / kind)) for kind in ("llama_bias", "qwen2")]
    out = str(tmp_path / "result")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(paths, str(tmp_path / "init"), out, "int8"), nprocs=2, join=True)
    results = torch.load(f"{out}.0")
    for path in paths:
        ref_logits, ref_tokens = _run(path, quantization="int8")
        logits, tokens = results[path]
        assert tokens == ref_tokens, path
        for got, want in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_shards_are_smaller(tmp_path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    cfg = load_model(str(path), dtype="float32").config
    from kubeinfer.engine.models.loader import build_model

    model = build_model(cfg, torch.device("cpu"), tp_rank=1, tp_size=2)
    attn = model.model.layers[0].self_attn
    assert model.num_kv_heads_per_rank == cfg.num_kv_heads // 2
    assert attn.qkv_proj.weight.shape[0] == (cfg.num_heads + 2 * cfg.num_kv_heads) // 2 * cfg.head_dim
    assert attn.o_proj.weight.shape[1] == cfg.num_heads * cfg.head_dim // 2
    assert model.lm_head.weight.shape[0] == cfg.vocab_size // 2
