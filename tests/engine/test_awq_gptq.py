"""AWQ / GPTQ 4-bit checkpoints on the CPU: the repack to Q4_1 rows against the fp32 dequantised reference
(random nibbles, zeros and scales packed by the test's own packers, tests/engine/awq_gptq_packing.py), a
tiny llama loaded AWQ- and GPTQ-packed against the same model loaded dense from the dequantised weights,
tensor parallelism over 2 gloo processes, and the errors.

The repack keeps every nibble and scale exactly; only the Q4_1 min ``m = -s·z`` is rounded to fp16, at
most 2^-11 |s·z| per weight (``BOUND``). A wrong nibble order, zero offset or group mapping moves a weight by
at least one scale step ``s``, far beyond it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.layers.int4_repack import awq_to_q4_1, gptq_to_q4_1
from kubeinfer.engine.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from kubeinfer.engine.layers.quantization import UnsupportedQuantization, prepare_model, resolve_method
from kubeinfer.engine.models.awq_gptq import parse_spec, repack
from kubeinfer.engine.models.loader import load_model
from torch import nn

from tests.engine.awq_gptq_packing import (
    dequantise,
    dequantise_q4_1,
    make_int4_checkpoints,
    pack_awq,
    pack_gptq,
)
from tests.engine.model_harness import generate_paged
from tests.engine.tiny_models import make_tiny_checkpoint

pytestmark = [pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build"),
              pytest.mark.usefixtures("float32_activations")]  # the repack's exactness, not the int8 arithmetic

# (N, K, group_size): odd N (multiples of 8, not of 32), K of 3 and 5 blocks, a whole-K group, and N over
# the repack's 2048-row chunk
SHAPES = [(40, 96, 32), (64, 128, 64), (24, 256, 128), (16, 160, -1), (2056, 64, 32)]
PROMPTS = [[5, 77, 200, 31, 9, 140, 66], [250, 3, 18], list(range(40, 70))]


def _random_int4(n: int, k: int, group: int, seed: int, zero_low: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
    z = torch.randint(zero_low, 16, (k // group, n), generator=gen).to(torch.int32)
    s = (torch.rand(k // group, n, generator=gen) * 0.03 + 1e-3).half()
    return q, z, s


def _check_rows(rows, q, z, s, group: int) -> tuple[float, float]:
    """Dequantised Q4_1 rows and their kernel matmul against the fp32 reference; returns the max errors."""
    ref = dequantise(q, z, s, group)
    got = qk.dequantize(rows.qtype, rows.data, rows.k)
    bound = (s.float() * z.float()).abs().t().repeat_interleave(group, 1) * 2.0**-11 + 1e-7
    err = (got - ref).abs()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g} over the fp16 rounding of s*z"
    x = torch.randn(5, q.shape[1], generator=torch.Generator().manual_seed(1))
    out = qk.matmul(x, rows.qtype, rows.data, rows.k, activations="f32")
    mm_err = float((out - x @ ref.t()).abs().max())
    assert mm_err < 1e-3 * float((x @ ref.t()).abs().max()) + 1e-4
    return float(err.max()), mm_err


@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
def test_awq_repack_matches_dequantised_reference(n: int, k: int, group_size: int) -> None:
    group = k if group_size == -1 else group_size
    q, z, s = _random_int4(n, k, group, seed=n + k)
    qweight, qzeros = pack_awq(q, z)
    assert qweight.shape == (k, n // 8) and qweight.dtype == torch.int32
    rows = awq_to_q4_1(qweight, qzeros, s, group_size)
    assert rows.qtype == qk.Q4_1 and rows.shape == (n, k) and rows.data.shape == (n, k // 32 * 20)
    print(f"awq {n}x{k} g{group_size}: max |W - ref| %.3g, matmul %.3g" % _check_rows(rows, q, z, s, group))


@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_repack_matches_dequantised_reference(n: int, k: int, group_size: int, fmt: str) -> None:
    group = k if group_size == -1 else group_size
    v1 = fmt == "gptq"
    q, z, s = _random_int4(n, k, group, seed=n * k, zero_low=1 if v1 else 0)  # v1 cannot store a zero of 0
    qweight, qzeros = pack_gptq(q, z, v1=v1)
    assert qweight.shape == (k // 8, n) and qzeros.shape == (k // group, n // 8)
    spec = parse_spec({"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": False,
                       "checkpoint_format": fmt})
    parts = {"qweight": qweight, "qzeros": qzeros, "scales": s,
             "g_idx": torch.arange(k, dtype=torch.int32) // group}
    rows = repack("layer", parts, spec)
    print(f"{fmt} {n}x{k} g{group_size}: max |W - ref| %.3g, matmul %.3g" % _check_rows(rows, q, z, s, group))


def test_gptq_sym_uses_zero_8_and_v1_reads_stored_zero_plus_one() -> None:
    q, _, s = _random_int4(32, 64, 32, seed=3)
    eights = torch.full((2, 32), 8, dtype=torch.int32)
    qweight, qzeros = pack_gptq(q, eights, v1=True)  # stores 7
    sym = gptq_to_q4_1(qweight, None, s, 32, zero_offset=1, fixed_zero=8)
    _check_rows(sym, q, eights, s, 32)
    v1 = gptq_to_q4_1(qweight, qzeros, s, 32, zero_offset=1)
    assert torch.equal(v1.data, sym.data)
    as_v2 = gptq_to_q4_1(qweight, qzeros, s, 32, zero_offset=0)  # the stored 7 taken as is: a different weight
    assert not torch.equal(as_v2.data, sym.data)


def _act_order(k: int, group: int, seed: int) -> torch.Tensor:
    """A GPTQ act-order ``g_idx``: ``group`` inputs per group, scattered over the inputs."""
    return (torch.arange(k, dtype=torch.int32) // group)[torch.randperm(k, generator=torch.Generator().manual_seed(seed))]


def _gptq_layer(layer: nn.Module, loads: list[tuple[dict, tuple]]) -> nn.Module:
    holder = nn.Module()
    holder.layer = layer
    prepare_model(holder, "gptq")
    spec = parse_spec({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False})
    for parts, shard in loads:
        layer.weight.weight_loader(layer.weight, repack("layer", parts, spec), *shard)
    return layer


def test_act_order_inputs_are_permuted_once_and_gathered_before_the_matmul() -> None:
    n, k, group = 48, 128, 32
    q, z, s = _random_int4(n, k, group, seed=4, zero_low=1)
    g_idx = _act_order(k, group, seed=4)
    ref = dequantise(q, z, s, group, g_idx)
    parts = {"qweight": pack_gptq(q, z)[0], "qzeros": pack_gptq(q, z)[1], "scales": s, "g_idx": g_idx}
    spec = parse_spec({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False})
    rows = repack("layer", parts, spec)
    assert rows.perm is not None and torch.equal(g_idx[rows.perm].long(), torch.arange(k) // group)
    err = (qk.dequantize(rows.qtype, rows.data, k) - ref[:, rows.perm]).abs()
    bound = (s.float() * z.float())[g_idx.long()].t()[:, rows.perm] * 2.0**-11 + 1e-7
    assert bool((err <= bound).all())
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    held = dequantise_q4_1(q, z, s, group, g_idx)  # the weights as the blocks hold them, in input order
    for rank in (0, 1):  # column-parallel shards keep the permutation
        layer = _gptq_layer(ColumnParallelLinear(k, n, tp_rank=rank, tp_size=2), [(parts, ())])
        want = x @ held[24 * rank:24 * (rank + 1)].t()
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)
    print(f"act-order: max |W - ref| {float(err.max()):.3g}")


def test_act_order_refusals() -> None:
    k = 64
    q, z, s = _random_int4(32, k, 32, seed=6, zero_low=1)
    qweight, qzeros = pack_gptq(q, z)
    parts = {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": _act_order(k, 32, seed=1)}
    with pytest.raises(UnsupportedQuantization, match=r"desc_act.*row-parallel"):
        _gptq_layer(RowParallelLinear(2 * k, 32, tp_rank=0, tp_size=2),
                    [({**parts, "qweight": torch.cat([qweight, qweight]), "g_idx": _act_order(2 * k, 32, 1),
                       "qzeros": torch.cat([qzeros, qzeros]), "scales": torch.cat([s, s])}, ())])
    other = {**parts, "g_idx": _act_order(k, 32, seed=2)}
    with pytest.raises(UnsupportedQuantization, match="different act-order"):
        _gptq_layer(MergedColumnParallelLinear(k, [32, 32]), [(parts, (0,)), (other, (1,))])
    uneven = {**parts, "g_idx": torch.cat([torch.zeros(40), torch.ones(24)]).to(torch.int32)}
    spec = parse_spec({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True})
    with pytest.raises(UnsupportedQuantization, match="every group 32 inputs"):
        repack("model.layers.0.mlp.up_proj", uneven, spec)


@pytest.mark.parametrize(("config", "match"), [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "only 4-bit"),
    ({"quant_method": "awq", "bits": 4, "group_size": 16}, "multiple of 32"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "GEMM"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
])
def test_unsupported_int4_configs(config: dict, match: str) -> None:
    with pytest.raises(UnsupportedQuantization, match=match):
        parse_spec(config)


# ---- end to end: a tiny llama, 4-bit packed, against the same weights dequantised and loaded dense -----------
# The repacked model differs from the exact dequantised one only by the fp16 rounding of m = -s*z (relative
# 2^-11, on weights of about +-1 quantized in steps of about 0.1) and summation order. Measured on logits
# spanning about 20: max |diff| 0.079 (awq-g32), 0.066 (gptq-g64), 5e-5 (sym: -8s is exact in fp16), 0.11
# (act-order, greedy picks 48/49: one near tie); bound: 1% of the span, 95% of the picks. Against the
# reference with m rounded as Q4_1 holds it, only the summation order is left: measured <= 5e-5, all picks
# equal; bound 1e-3.
# The sym case also carries zero biases on its bias-free linears (skipped at load, as vLLM does).
# (method, group size, tiny model, sym, act-order)
CASES = {"awq-g32": ("awq", 32, "llama", False, False), "gptq-g64-bias": ("gptq", 64, "llama_bias", False, False),
         "gptq-whole-k-sym": ("gptq", -1, "llama", True, False),
         "gptq-g32-act-order": ("gptq", 32, "llama_bias", False, True)}


def _logits(model: nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [torch.stack(s.logits) for s in generate_paged(model, prompts, max_new_tokens=4, chunk=5)]


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_int4_checkpoint_matches_dequantised_dense(case: str, tmp_path) -> None:
    method, group_size, kind, sym, act_order = CASES[case]
    quantized_dir, dense_dir = make_int4_checkpoints(method, tmp_path, group_size, kind=kind, sym=sym,
                                                     zero_biases=sym, act_order=act_order)
    quantized = load_model(str(quantized_dir), dtype="float32")  # the method comes from quantization_config
    dense = load_model(str(dense_dir), dtype="float32")
    assert quantized.quantization == method and dense.quantization == "none"
    report = quantized.weights
    assert report.qtypes == ["Q4_1"] and report.quantized_tensors == 4 * 2  # qkv, o, gate_up, down x 2 layers
    cfg = quantized.config
    linear_weights = cfg.num_layers * cfg.hidden_size * (
        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim
        + 3 * cfg.intermediate_size)
    assert report.quantized_bytes == linear_weights // 32 * 20  # Q4_1: 20 bytes per 32 weights
    assert report.dense_bytes < dense.weights.dense_bytes - 3 * report.quantized_bytes
    for name, module in quantized.model.named_modules():
        if name.endswith("_proj"):
            assert module.quantized is not None and module.weight.numel() == 0, name
    assert quantized.model.lm_head.quantized is None  # embedding and LM head stay dense
    ref = _logits(dense.model, PROMPTS)
    got = _logits(quantized.model, PROMPTS)
    worst = max(float((r - g).abs().max()) for r, g in zip(ref, got, strict=True))
    span = max(float(r.max() - r.min()) for r in ref)
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got, strict=True))
    total = sum(r.shape[0] for r in ref)
    print(f"{case}: max |logit diff| {worst:.3g} of a span {span:.3g}, top-1 agreement {agree}/{total}")
    assert worst < 0.01 * span
    assert agree >= 0.95 * total  # the rounding of m may flip a near tie
    rounded = load_model(str(make_int4_checkpoints(method, tmp_path / "rounded", group_size, kind=kind, sym=sym,
                                                   min_rounded=True, act_order=act_order)[1]), dtype="float32")
    held = _logits(rounded.model, PROMPTS)
    tight = max(float((r - g).abs().max()) for r, g in zip(held, got, strict=True))
    print(f"{case}: max |logit diff| {tight:.3g} against the reference with m rounded to fp16")
    assert tight < 1e-3
    assert all(torch.equal(r.argmax(-1), g.argmax(-1)) for r, g in zip(held, got, strict=True))


def test_explicit_method_must_match_the_checkpoint(tmp_path) -> None:
    awq_dir, dense_dir = make_int4_checkpoints("awq", tmp_path, 32)
    assert load_model(str(awq_dir), dtype="float32", quantization="awq").quantization == "awq"
    with pytest.raises(UnsupportedQuantization, match="--quantization awq needs a checkpoint quantized with awq"):
        load_model(str(dense_dir), dtype="float32", quantization="awq")
    with pytest.raises(UnsupportedQuantization, match="this one is quantized with awq"):
        load_model(str(awq_dir), dtype="float32", quantization="gptq")
    with pytest.raises(UnsupportedQuantization, match="quantized with awq: use --quantization awq"):
        load_model(str(awq_dir), dtype="float32", quantization="int8")


def test_gptq_config_in_a_separate_quantize_config_json(tmp_path) -> None:
    """AutoGPTQ's own layout: config.json without quantization_config, quantize_config.json beside it."""
    gptq_dir, _ = make_int4_checkpoints("gptq", tmp_path, 64)
    config = json.loads((gptq_dir / "config.json").read_text())
    qc = config.pop("quantization_config")
    del qc["quant_method"]
    (gptq_dir / "config.json").write_text(json.dumps(config))
    (gptq_dir / "quantize_config.json").write_text(json.dumps(qc))
    loaded = load_model(str(gptq_dir), dtype="float32")
    assert loaded.quantization == "gptq" and loaded.weights.qtypes == ["Q4_1"]


def test_resolve_method_for_prequantized_checkpoints() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_method(None, "hf", cpu, "gptq") == "gptq"
    assert resolve_method(None, "hf", cpu) == "none"
    assert resolve_method(None, "hf", cuda, "awq") == "awq"  # (the Triton 4-bit kernel: gpu_quantization.py)
    with pytest.raises(UnsupportedQuantization, match=r"supported: .*awq with a Hugging Face checkpoint on cpu"):
        resolve_method("awq", "gguf", cuda)
    with pytest.raises(UnsupportedQuantization, match=r"'fp8'.*cannot be loaded"):
        resolve_method(None, "hf", cpu, "fp8")


def test_row_parallel_split_must_fall_on_a_32_block() -> None:
    """Groups need not align to shards (each Q4_1 block has its own scale), 32-element blocks must."""
    q, z, s = _random_int4(16, 96, 96, seed=5)
    rows = awq_to_q4_1(*pack_awq(q, z), s, -1)
    holder = nn.Module()
    holder.layer = RowParallelLinear(96, 16, tp_rank=0, tp_size=2)
    prepare_model(holder, "awq")
    with pytest.raises(ValueError, match="32-element block"):
        holder.layer.weight.weight_loader(holder.layer.weight, rows)


# ---- tensor parallelism: 2 gloo ranks against one process, both kept quantized ------------------------------
def _run(path: str, tp_rank: int = 0, tp_size: int = 1) -> list[torch.Tensor]:
    return _logits(load_model(path, dtype="float32", tp_rank=tp_rank, tp_size=tp_size).model, PROMPTS[:2])


def _worker(rank: int, paths: list[str], init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.save({path: _run(path, rank, 2) for path in paths}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_model_tp.py: skip C++ static destructors that can abort after gloo + OpenMP


@pytest.mark.timeout(300)
def test_tp2_int4_matches_single_process(tmp_path) -> None:
    """Column shards split output rows; row shards (o_proj, down_proj) split inside a group for GPTQ with one
    group over the whole input."""
    paths = [str(make_int4_checkpoints("awq", tmp_path / "awq", 32)[0]),
             str(make_int4_checkpoints("gptq", tmp_path / "gptq", -1, kind="llama_bias")[0])]
    out = str(tmp_path / "result")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(paths, str(tmp_path / "init"), out), nprocs=2, join=True)
    results = torch.load(f"{out}.0")
    for path in paths:
        for got, want in zip(results[path], _run(path), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dense_checkpoint_is_unaffected(tmp_path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "tiny")
    assert load_model(str(path), dtype="float32").quantization == "none"


def test_awq_serves_through_the_offline_api(tmp_path) -> None:
    """``LLM`` on an AWQ checkpoint (method from its config): greedy tokens equal those of the dense model
    holding the weights exactly as the Q4_1 blocks do."""
    from kubeinfer.engine import LLM, SamplingParams

    options = dict(dtype="float32", max_num_batched_tokens=64, num_gpu_blocks_override=32, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    awq_dir, dense_dir = make_int4_checkpoints("awq", tmp_path, 32, min_rounded=True)
    tokens = {}
    for name, path in (("awq", awq_dir), ("dense", dense_dir)):
        out = LLM(str(path), **options).generate(["hello there", "a"], params)
        tokens[name] = [list(o.outputs[0].token_ids) for o in out]
    assert [len(t) for t in tokens["awq"]] == [6, 6]
    assert tokens["awq"] == tokens["dense"]
