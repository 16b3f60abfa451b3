"""Triton attention backend vs a naive per-sequence torch reference written here.

On the CPU the kernels run in Triton's interpreter: the module is loaded as a private copy
with ``TRITON_INTERPRET=1`` set while its kernels are decorated, so the check exercises the
real kernel code (asserted below) and never leaks interpreter mode into other tests. With a
CUDA GPU the same checks run compiled, in this process, on the GPU (``compiled_mode``; asserted
too), and the compiled kernels are also checked on larger fp16/bf16 shapes.

Tolerances (vs a float64 reference): fp32 inputs 2e-5 abs/rel (the interpreter's fp32 dot is
exact up to summation order; 1e-4 for compiled fp32 on a GPU); fp16 inputs 3e-3 (one fp16 rounding of the probabilities and of
the output); bf16 on GPU 2e-2 (8-bit mantissa).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import random
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import triton
from kubeinfer.engine.attention_metadata import AttentionMetadata

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GPU_TOLERANCE = TOLERANCE | {torch.float32: 1e-4}  # FMA dots sum in another order than float64


MODE_ENV = "KUBEINFER_TRITON_TESTS"  # auto (default) | interpret | compiled


def compiled_mode() -> bool:
    """Whether the kernel checks below run compiled on a CUDA GPU instead of in the interpreter.

    ``auto``: compiled when a CUDA GPU is visible. ``compiled`` (what ``make gpu-check`` sets) fails
    without one; ``interpret`` forces the interpreter (the worker process always gets it).
    """
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "interpret", "compiled"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected auto, interpret or compiled")
    if mode == "interpret":
        return False
    if mode == "compiled" and not torch.cuda.is_available():
        raise RuntimeError(f"{MODE_ENV}=compiled but torch sees no CUDA GPU")
    return torch.cuda.is_available()


def kernel_device() -> str:
    """Where the checks put their tensors: the GPU when compiled, else the CPU (the interpreter)."""
    return "cuda" if compiled_mode() else "cpu"


class _InProcess:
    """The executor of compiled mode: runs each check at once, here, with the normal (compiled) triton."""

    def submit(self, fn: Callable[..., object], *args: object) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # handed back through result(), like a worker's exception
            future.set_exception(error)
        return future


@contextlib.contextmanager
def interpreter_pool() -> Iterator[concurrent.futures.Executor]:
    """One worker process whose Triton runs in interpreter mode (in compiled mode: this process).

    ``TRITON_INTERPRET`` must be set before triton is imported (its own helpers such as
    ``tl.zeros`` are jit functions decorated at import), so the kernels run in a fresh
    spawned process that inherits the variable; this process's triton stays untouched.
    """
    if compiled_mode():
        yield _InProcess()  # type: ignore[misc]
        return
    overrides = {"TRITON_INTERPRET": "1", MODE_ENV: "interpret"}
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
        pool.submit(int).result()  # start the worker now, while the variables are set
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield pool
    finally:
        pool.shutdown()


@pytest.fixture(scope="module")
def interp() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with interpreter_pool() as pool:
        yield pool


def in_interpreter(
    pool: concurrent.futures.ProcessPoolExecutor,
    check: Callable[..., object],
    *args: object,
    module: str = "kubeinfer.engine.layers.triton_attention",
):
    """Run ``check(module, *args)`` in the interpreter worker (compiled mode: here, on the GPU);
    assertion errors come back here."""
    return pool.submit(_call_with_kernel_module, module, check, args).result(timeout=300)


def _call_with_kernel_module(module_name: str, check: Callable[..., object], args: tuple) -> object:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(module_name)
    kernels = {
        name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction | InterpretedFunction)
    }
    assert kernels, f"{module_name} defines no Triton kernels"
    interpreted = [name for name, obj in kernels.items() if isinstance(obj, InterpretedFunction)]
    if compiled_mode():
        assert not interpreted, f"kernels {interpreted} are interpreted: unset TRITON_INTERPRET to run them compiled"
    else:
        compiled = [name for name in kernels if name not in interpreted]
        assert not compiled, f"kernels {compiled} would not run in the Triton interpreter"
    return check(module, *args)


# --------------------------------------------------------------------------- batch building


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    block_size: int,
    num_kv_heads: int,
    queries_per_kv: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Random caches (context already filled), shuffled non-contiguous block tables, new Q/K/V
    (drawn on the CPU, then moved to ``device``: ``kernel_device()`` unless given)."""
    device = device or kernel_device()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) * 2 + 3  # spare blocks that no sequence owns
    block_ids = list(range(1, num_blocks))  # block 0 is the block-table padding value: keep it unowned
    rng.shuffle(block_ids)
    tables, taken = [], 0
    for n in blocks_per_seq:
        tables.append(block_ids[taken : taken + n])
        taken += n
    width = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, ids in enumerate(tables):
        block_tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    num_tokens = sum(query_lens)
    heads = num_kv_heads * queries_per_kv
    query = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)

    slots = []
    for ids, q_len, s_len in zip(tables, query_lens, seq_lens, strict=True):
        for pos in range(s_len - q_len, s_len):
            slots.append(ids[pos // block_size] * block_size + pos % block_size)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
    to = {"device": device}
    return {
        "query": query.to(**to),
        "key": key.to(**to),
        "value": value.to(**to),
        "k_cache": k_cache.to(**to),
        "v_cache": v_cache.to(**to),
        "metadata": metadata,
        "scale": head_dim**-0.5,
    }


# --------------------------------------------------------------------------- reference


def reference_store(key, value, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]


def reference_attention(query, k_cache, v_cache, md: AttentionMetadata, scale: float) -> torch.Tensor:
    """Per sequence: gather its context token by token, causal softmax in float64."""
    block_size = k_cache.shape[1]
    qpk = query.shape[1] // k_cache.shape[2]
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    start = 0
    for i, (q_len, s_len) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu, strict=True)):
        positions = torch.arange(s_len, device=query.device)
        blocks = md.block_tables[i].long()[positions // block_size]
        keys = k_cache[blocks, positions % block_size].double().repeat_interleave(qpk, dim=1)
        values = v_cache[blocks, positions % block_size].double().repeat_interleave(qpk, dim=1)
        q = query[start : start + q_len].double()
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        limit = (s_len - q_len) + torch.arange(q_len, device=query.device)
        scores = scores.masked_fill(positions[None, :] > limit[:, None], float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        start += q_len
    return out


def run_backend(
    backend: ModuleType, batch: dict, config=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k_cache, v_cache = batch["k_cache"].clone(), batch["v_cache"].clone()
    md = batch["metadata"]
    backend.store_kv_cache(batch["key"], batch["value"], k_cache, v_cache, md.slot_mapping)
    if config is None:
        out = backend.paged_attention(batch["query"], k_cache, v_cache, md, batch["scale"])
    else:
        out = backend.paged_attention_with_config(
            batch["query"], k_cache, v_cache, md, batch["scale"], config
        )
    return out, k_cache, v_cache


def fp32_tolerance(out: torch.Tensor) -> float:
    return TOLERANCE[torch.float32] if out.device.type == "cpu" else GPU_TOLERANCE[torch.float32]


def check_against_reference(backend: ModuleType, batch: dict, config=None) -> None:
    out, k_cache, v_cache = run_backend(backend, batch, config)
    ref_k, ref_v = batch["k_cache"].clone(), batch["v_cache"].clone()
    md = batch["metadata"]
    reference_store(batch["key"], batch["value"], ref_k, ref_v, md.slot_mapping)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), "store_kv_cache wrote wrong slots"
    expected = reference_attention(batch["query"], ref_k, ref_v, md, batch["scale"])
    assert out.dtype == batch["query"].dtype and out.shape == batch["query"].shape
    tol = TOLERANCE[out.dtype] if out.device.type == "cpu" else GPU_TOLERANCE[out.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- interpreter tests
# Each check_* function runs inside the interpreter worker with the backend module as first argument.

# (query_lens, seq_lens): decode, prefill, chunked prefill over a cached prefix, mixed batch.
SHAPES = {
    "decode": ([1, 1, 1], [1, 17, 40]),
    "prefill": ([5, 19], [5, 19]),
    "chunked_prefill": ([7], [30]),
    "mixed": ([1, 9, 1, 4], [33, 9, 5, 20]),
}


def check_case(backend: ModuleType, batch_kwargs: dict, config: dict | None = None) -> None:
    batch = make_batch(**batch_kwargs)
    check_against_reference(backend, batch, backend.LaunchConfig(**config) if config else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("queries_per_kv", [1, 3], ids=["mha", "gqa3"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_matches_reference(interp, shape, queries_per_kv, dtype):
    query_lens, seq_lens = SHAPES[shape]
    batch = dict(
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_size=16,
        num_kv_heads=2,
        queries_per_kv=queries_per_kv,
        head_dim=64,
        dtype=dtype,
    )
    in_interpreter(interp, check_case, batch)


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes_and_head_dim_128(interp, block_size):
    query_lens, seq_lens = SHAPES["mixed"]
    batch = dict(
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_size=block_size,
        num_kv_heads=1,
        queries_per_kv=3,
        head_dim=128,
        dtype=torch.float16,
    )
    in_interpreter(interp, check_case, batch)


def test_non_power_of_two_head_dim(interp):
    batch = dict(
        query_lens=[1, 6],
        seq_lens=[21, 6],
        block_size=8,
        num_kv_heads=1,
        queries_per_kv=2,
        head_dim=80,
        dtype=torch.float32,
    )
    in_interpreter(interp, check_case, batch)


@pytest.mark.parametrize("num_splits", [2, 4])
@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_split_context_flash_decoding(interp, shape, num_splits):
    """Split mode is correct even when some splits get no tiles (short contexts)."""
    query_lens, seq_lens = SHAPES[shape]
    batch = dict(
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_size=8,
        num_kv_heads=2,
        queries_per_kv=3,
        head_dim=64,
        dtype=torch.float32,
    )
    config = dict(block_m=16, tile_n=16, num_splits=num_splits, num_warps=4, num_stages=1)
    in_interpreter(interp, check_case, batch, config)


@pytest.mark.parametrize(
    "block_m,tile_n",
    [(16, 16), (64, 64), (128, 64)],
    ids=["small_tiles", "prefill64", "prefill128"],
)
def test_prefill_launch_shapes(interp, block_m, tile_n):
    """The GPU prefill tile shapes, plus small tiles so causal edges fall inside tiles."""
    batch = dict(
        query_lens=[13, 1, 6],
        seq_lens=[29, 12, 6],
        block_size=8,
        num_kv_heads=2,
        queries_per_kv=3,
        head_dim=64,
        dtype=torch.float16,
    )
    config = dict(block_m=block_m, tile_n=tile_n, num_splits=1, num_warps=4, num_stages=1)
    in_interpreter(interp, check_case, batch, config)


def check_query_from_fused_qkv(backend: ModuleType) -> None:
    """Q arrives as a strided view of one fused qkv projection, not a contiguous tensor."""
    batch = make_batch(
        [1, 9, 1, 4],
        [33, 9, 5, 20],
        block_size=8,
        num_kv_heads=2,
        queries_per_kv=3,
        head_dim=64,
        dtype=torch.float32,
    )
    query = batch["query"]
    qkv = torch.cat([query.flatten(1), torch.randn(query.shape[0], 2 * 2 * 64, device=query.device)], dim=1)
    batch["query"] = qkv[:, : query[0].numel()].view(query.shape)
    assert not batch["query"].is_contiguous()
    check_against_reference(backend, batch)


def test_query_from_fused_qkv(interp):
    in_interpreter(interp, check_query_from_fused_qkv)


def check_padded_decode_batch(backend: ModuleType, num_splits: int) -> None:
    """CUDA-graph style padding: extra sequences with one query, no context, slot -1 and an all-zero block table."""
    batch = make_batch(
        [1, 1, 1],
        [9, 30, 2],
        block_size=8,
        num_kv_heads=2,
        queries_per_kv=3,
        head_dim=64,
        dtype=torch.float32,
    )
    md, pad, device = batch["metadata"], 2, batch["query"].device
    padded_md = dataclasses.replace(
        md,
        slot_mapping=torch.cat([md.slot_mapping, torch.full((pad,), -1, device=device)]),
        query_start_loc=torch.arange(md.num_seqs + pad + 1, dtype=torch.int32, device=device),
        seq_lens=torch.cat([md.seq_lens, torch.zeros(pad, dtype=torch.int32, device=device)]),
        block_tables=torch.cat(
            [md.block_tables, torch.zeros(pad, md.block_tables.shape[1], dtype=torch.int32, device=device)]
        ),
        query_lens_cpu=md.query_lens_cpu + [1] * pad,
        seq_lens_cpu=md.seq_lens_cpu + [0] * pad,
    )
    padded = dict(batch, metadata=padded_md)
    for name in ("query", "key", "value"):
        padded[name] = torch.cat([batch[name], torch.randn(pad, *batch[name].shape[1:], device=device)])
    config = backend.LaunchConfig(block_m=16, tile_n=16, num_splits=num_splits, num_warps=4, num_stages=1)
    out, k_cache, v_cache = run_backend(backend, padded, config)
    assert torch.equal(k_cache[0], batch["k_cache"][0]) and torch.equal(v_cache[0], batch["v_cache"][0]), (
        "a padding token wrote into block 0"
    )
    expected, *_ = run_backend(backend, batch, config)
    torch.testing.assert_close(out[:-pad], expected, atol=0, rtol=0)
    assert torch.isfinite(out[-pad:]).all(), "padding rows must not produce NaN/inf"
    check_against_reference(backend, batch, config)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_padded_decode_batch(interp, num_splits):
    in_interpreter(interp, check_padded_decode_batch, num_splits)


def check_store_skips_negative_slots(backend: ModuleType) -> None:
    num_blocks, block_size, kv_heads, head_dim = 4, 8, 2, 64
    device = kernel_device()
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=device)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(4, kv_heads, head_dim, device=device)
    value = torch.randn(4, kv_heads, head_dim, device=device)
    backend.store_kv_cache(key, value, k_cache, v_cache, torch.tensor([9, -1, 30, -1], device=device))
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat_k[9], key[0]) and torch.equal(flat_k[30], key[2])
    assert torch.equal(flat_v[9], value[0]) and torch.equal(flat_v[30], value[2])
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[[9, 30]] = True
    assert flat_k[~written].abs().sum() == 0 and flat_v[~written].abs().sum() == 0, (
        "a skipped slot was written"
    )


def test_store_skips_negative_slots(interp):
    in_interpreter(interp, check_store_skips_negative_slots)


def check_store_from_non_contiguous_views(backend: ModuleType) -> None:
    kv_heads, head_dim, device = 2, 64, kernel_device()
    qkv = torch.randn(3, 3 * kv_heads * head_dim, device=device)
    key = qkv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(3, kv_heads, head_dim)
    value = qkv[:, 2 * kv_heads * head_dim :].view(3, kv_heads, head_dim)
    k_cache = torch.zeros(2, 8, kv_heads, head_dim, dtype=torch.float16, device=device)
    v_cache = torch.zeros_like(k_cache)
    backend.store_kv_cache(key, value, k_cache, v_cache, torch.tensor([0, 15, 3], device=device))
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[[0, 15, 3]], key.half())
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[[0, 15, 3]], value.half())


def test_store_from_non_contiguous_views_with_cast(interp):
    """K/V usually arrive as slices of one fused qkv projection."""
    in_interpreter(interp, check_store_from_non_contiguous_views)


def check_bad_shapes_raise_clear_errors(backend: ModuleType) -> None:
    batch = make_batch(
        [1], [5], block_size=8, num_kv_heads=2, queries_per_kv=1, head_dim=64, dtype=torch.float32
    )
    md, device = batch["metadata"], batch["query"].device
    with pytest.raises(ValueError, match="multiple of KV heads"):
        backend.paged_attention(torch.zeros(1, 3, 64, device=device), batch["k_cache"], batch["v_cache"], md, 1.0)
    odd_cache = torch.zeros(4, 12, 2, 64, device=device)
    with pytest.raises(ValueError, match="power of two"):
        backend.store_kv_cache(batch["key"], batch["value"], odd_cache, odd_cache.clone(), md.slot_mapping)
    with pytest.raises(ValueError, match="slot_mapping"):
        backend.store_kv_cache(
            batch["key"], batch["value"], batch["k_cache"], batch["v_cache"], torch.zeros(2, device=device)
        )


def test_bad_shapes_raise_clear_errors(interp):
    in_interpreter(interp, check_bad_shapes_raise_clear_errors)


def check_reference_detects_a_wrong_answer(backend: ModuleType) -> None:
    batch = make_batch(
        [1, 4], [20, 4], block_size=8, num_kv_heads=1, queries_per_kv=1, head_dim=64, dtype=torch.float32
    )
    out, k_cache, v_cache = run_backend(backend, batch)
    md = batch["metadata"]
    expected = reference_attention(batch["query"], k_cache, v_cache, md, batch["scale"])
    tol = fp32_tolerance(out)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    v_cache[md.block_tables[0, 0]] += 1.0  # the reference now sees a different context
    expected = reference_attention(batch["query"], k_cache, v_cache, md, batch["scale"])
    assert not torch.allclose(out.double(), expected, atol=1e-3)


def test_reference_detects_a_wrong_answer(interp):
    """Guard that the comparison can fail: a perturbed cache must not pass."""
    in_interpreter(interp, check_reference_detects_a_wrong_answer)


def check_agrees_with_torch_backend(backend: ModuleType, shape: str, queries_per_kv: int) -> None:
    from kubeinfer.engine.layers import attention as torch_backend

    query_lens, seq_lens = SHAPES[shape]
    batch = make_batch(
        query_lens,
        seq_lens,
        block_size=8,
        num_kv_heads=2,
        queries_per_kv=queries_per_kv,
        head_dim=64,
        dtype=torch.float32,
    )
    out, k_cache, v_cache = run_backend(backend, batch)
    expected, ref_k, ref_v = run_backend(torch_backend, batch)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    tol = fp32_tolerance(out)
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("queries_per_kv", [1, 3], ids=["mha", "gqa3"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_agrees_with_production_torch_backend(interp, shape, queries_per_kv):
    """Both backends implement one contract (engine/layers/attention.py is the CPU one): compare directly."""
    in_interpreter(interp, check_agrees_with_torch_backend, shape, queries_per_kv)


# --------------------------------------------------------------------------- sm_90 compile checks
# The interpreter cannot catch compiled-mode errors (loop-carried types, layouts) or register
# spills. Triton compiles for an H100 without a GPU (ptxas ships with it), so check here that
# every launch shape the backend picks compiles for sm_90 with realistic argument
# specialisation, and that the fp16/bf16 shapes keep everything in registers.

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
}


def compile_for_sm90(kernel, args: dict, constexprs: dict, *, do_not_specialize=(), **options):
    """``triton.compile`` as a launch on an H100 would: pointers and ints divisible by 16 get that hint."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, torch.dtype):
            signature[name], attrs[(i,)] = "*" + _TRITON_TYPES[value], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0 and name not in do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    options.setdefault("enable_fp_fusion", True)  # Triton 3.9's default, stated to silence its warning
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def local_memory_bytes(compiled) -> int | None:
    """Per-thread stack (spills) of a compiled kernel, read with the cuobjdump Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True
        )
    found = re.search(r"STACK:(\d+)", usage.stdout)
    return int(found.group(1)) if found else None


def skip_unless_sm90_compiles() -> None:
    from kubeinfer.engine.layers import triton_attention
    from triton.runtime.jit import JITFunction

    if not isinstance(triton_attention._paged_attention_kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process: kernels are not compiled")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas: cannot compile for sm_90 here")


@pytest.fixture(scope="module")
def compiled_backend() -> ModuleType:
    skip_unless_sm90_compiles()
    from kubeinfer.engine.layers import triton_attention

    return triton_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)], ids=["llama8b", "smollm2"])
@pytest.mark.parametrize("mode", ["decode", "decode_split", "prefill"])
def test_attention_compiles_for_h100(compiled_backend, dtype, heads, kv_heads, head_dim, mode):
    backend = compiled_backend
    block_size = 16
    query = torch.empty(4, heads, head_dim, dtype=dtype)
    metadata = make_batch(
        [1], [4], block_size=block_size, num_kv_heads=1, queries_per_kv=1, head_dim=16, dtype=dtype, device="cpu"
    )["metadata"]
    metadata.max_query_len = 2048 if mode == "prefill" else 1
    config = backend._launch_config(query, kv_heads, metadata)
    if mode == "decode_split":
        config = dataclasses.replace(config, num_splits=8)
    queries_per_kv = heads // kv_heads
    slot_stride = kv_heads * head_dim
    args = dict(
        out_ptr=dtype,
        part_out_ptr=torch.float32,
        part_max_ptr=torch.float32,
        part_sum_ptr=torch.float32,
        q_ptr=dtype,
        k_cache_ptr=dtype,
        v_cache_ptr=dtype,
        block_tables_ptr=torch.int32,
        seq_lens_ptr=torch.int32,
        query_start_loc_ptr=torch.int32,
        qk_scale_log2=0.1,
        num_seqs=3,
        num_heads=heads,
        q_stride_t=heads * head_dim,
        q_stride_h=head_dim,
        o_stride_t=heads * head_dim,
        o_stride_h=head_dim,
        kc_stride_block=block_size * slot_stride,
        kc_stride_slot=slot_stride,
        kc_stride_head=head_dim,
        vc_stride_block=block_size * slot_stride,
        vc_stride_slot=slot_stride,
        vc_stride_head=head_dim,
        bt_stride=64,
    )
    constexprs = dict(
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_Q=config.block_m // queries_per_kv,
        TILE_N=config.tile_n,
        NUM_SPLITS=config.num_splits,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    compiled = compile_for_sm90(
        backend._paged_attention_kernel,
        args,
        constexprs,
        do_not_specialize=("num_seqs",),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    ptx = compiled.asm["ptx"]
    assert "cp.async" in ptx or "ld.global.v4" in ptx, "K/V tiles must load with 16-byte vectors"
    if dtype != torch.float32:
        assert local_memory_bytes(compiled) in (0, None), f"{config} spills registers"


def test_helper_kernels_compile_for_h100(compiled_backend):
    backend = compiled_backend
    ints = ("key_stride_t", "key_stride_h", "value_stride_t", "value_stride_h")
    store_args = {name: 1024 for name in ints} | {
        f"{c}c_stride_{d}": 1024 for c in "kv" for d in ("block", "slot", "head")
    }
    store_args |= dict(
        key_ptr=torch.bfloat16,
        value_ptr=torch.bfloat16,
        k_cache_ptr=torch.bfloat16,
        v_cache_ptr=torch.bfloat16,
        slot_mapping_ptr=torch.int64,
    )
    store_const = dict(BLOCK_SIZE=16, NUM_KV_HEADS=3, HEAD_DIM=64, HEADS_PAD=4, HEAD_DIM_PAD=64)
    compile_for_sm90(backend._store_kv_kernel, store_args, store_const, num_warps=1)
    reduce_args = dict(
        out_ptr=torch.bfloat16,
        part_out_ptr=torch.float32,
        part_max_ptr=torch.float32,
        part_sum_ptr=torch.float32,
        num_heads=32,
        o_stride_t=4096,
        o_stride_h=128,
    )
    compile_for_sm90(
        backend._reduce_splits_kernel,
        reduce_args,
        dict(HEAD_DIM=128, HEAD_DIM_PAD=128, NUM_SPLITS=32),
        num_warps=4,
    )


# --------------------------------------------------------------------------- GPU tests

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled Triton kernels cannot run on the CPU"
)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize(
    "query_lens,seq_lens",
    [
        ([1] * 4, [4096, 1000, 17, 2500]),  # decode, long contexts: the split (flash-decoding) path
        ([1] * 64, [random.Random(i).randint(1, 3000) for i in range(64)]),  # decode, large batch
        ([300, 1, 77, 1], [300, 2048, 900, 33]),  # mixed: prefill, chunk over a prefix, decodes
        ([1024], [1024]),  # long prefill
    ],
    ids=["decode_long", "decode_batch", "mixed", "prefill"],
)
@pytest.mark.parametrize("block_size", [16, 64])
def test_cuda_matches_reference(query_lens, seq_lens, dtype, block_size):
    from kubeinfer.engine.layers import triton_attention

    batch = make_batch(
        query_lens,
        seq_lens,
        block_size=block_size,
        num_kv_heads=4,
        queries_per_kv=4,
        head_dim=128,
        dtype=dtype,
        device="cuda",
    )
    check_against_reference(triton_attention, batch)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits", [1, 8])
def test_cuda_smollm_shape(num_splits):
    """SmolLM2-135M: 9 query heads over 3 KV heads, head_dim 64."""
    from kubeinfer.engine.layers import triton_attention

    batch = make_batch(
        [1, 1, 40],
        [700, 3, 128],
        block_size=16,
        num_kv_heads=3,
        queries_per_kv=3,
        head_dim=64,
        dtype=torch.bfloat16,
        device="cuda",
    )
    config = triton_attention.LaunchConfig(
        block_m=16, tile_n=64, num_splits=num_splits, num_warps=4, num_stages=3
    )
    check_against_reference(triton_attention, batch, config)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "capture_max_seq_len", [16, 4096], ids=["captured_without_splits", "captured_with_splits"]
)
def test_cuda_graph_replay_as_contexts_grow(capture_max_seq_len):
    """Decode is captured once in a CUDA graph and replayed as every context grows; results stay exact."""
    from kubeinfer.engine.layers import triton_attention

    final_lens = [3000, 100, 2000, 17]
    batch = make_batch(
        [1] * 4,
        final_lens,
        block_size=16,
        num_kv_heads=2,
        queries_per_kv=4,
        head_dim=128,
        dtype=torch.bfloat16,
        device="cuda",
    )
    md, scale = batch["metadata"], batch["scale"]
    k_cache, v_cache = batch["k_cache"], batch["v_cache"]
    triton_attention.store_kv_cache(batch["key"], batch["value"], k_cache, v_cache, md.slot_mapping)
    md.seq_lens.copy_(torch.tensor([10, 3, 16, 1], dtype=torch.int32))  # the contexts at capture time
    md.max_seq_len = capture_max_seq_len  # host facts the launch config was chosen from

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        triton_attention.paged_attention(batch["query"], k_cache, v_cache, md, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.paged_attention(batch["query"], k_cache, v_cache, md, scale)

    md.seq_lens.copy_(torch.tensor(final_lens, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    md.max_seq_len, md.seq_lens_cpu = max(final_lens), final_lens
    expected = reference_attention(batch["query"], k_cache, v_cache, md, scale)
    tol = GPU_TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.gpu
@requires_cuda
def test_cuda_agrees_with_torch_backend():
    from kubeinfer.engine.layers import attention as torch_backend
    from kubeinfer.engine.layers import triton_attention

    batch = make_batch(
        [300, 1, 77, 1],
        [300, 2048, 900, 33],
        block_size=16,
        num_kv_heads=3,
        queries_per_kv=3,
        head_dim=64,
        dtype=torch.bfloat16,
        device="cuda",
    )
    out, k_cache, v_cache = run_backend(triton_attention, batch)
    expected, ref_k, ref_v = run_backend(torch_backend, batch)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    tol = GPU_TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
