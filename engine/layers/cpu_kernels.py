"""The C++ CPU kernels (``engine/csrc/cpu_kernels.cpp``) as functions on torch tensors.

Each wrapper checks what the kernel assumes (CPU, a supported dtype, unit stride along the last
dimension) and passes raw pointers through ctypes, which releases the GIL for the call. Use
``available()`` first: without a C++ compiler the library does not exist and callers keep torch.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
from kubeinfer.engine.csrc import build

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "ki_variant": [],
    "ki_rms_norm": [_INT, _P, _I64, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _F32],
    "ki_silu_and_mul": [_INT, _P, _I64, _P, _I64, _I64, _I64],
    "ki_rotary_and_store": [_INT, _INT, _P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64],
    "ki_linear": [_INT, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _INT],
    "ki_paged_decode_attention": [_INT, _INT, _P, _I64, _P, _I64, _P, _P, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64,
                                  _F32, _INT],
    "ki_argmax_rows": [_P, _I64, _I64, _I64, _P],
    "ki_run_program": [_P, _I64],
    "ki_work_pool_run": [],
    "ki_work_pool_park": [],
    "ki_work_pool_use_openmp": [_INT],
}
_RESTYPES = {"ki_work_pool_run": ctypes.c_void_p}  # (the others return an int status)


VARIANT_NAMES = {code: name for name, code in build.VARIANT_CODES.items()}


def configure(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the entry points' signatures on a loaded kernel library (any variant)."""
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name, ctypes.c_int)
    return lib


@cache
def _lib() -> ctypes.CDLL | None:
    lib = build.load()
    return None if lib is None else configure(lib)


def available() -> bool:
    return _lib() is not None


def work_pool_run() -> int | None:
    """The address of the work pool's entry point (``engine/csrc/work_pool.h``), for the quantized kernels to
    run on the same helper threads; None without the library."""
    lib = _lib()
    return None if lib is None else lib.ki_work_pool_run()


def park_workers() -> None:
    """Send the work pool's spinning helpers to sleep: the step's kernels are done, and the cores are the
    sampler's, the server's and other processes' until the next step."""
    lib = _lib()
    if lib is not None:
        lib.ki_work_pool_park()


def use_openmp_threads(on: bool) -> bool:
    """Run the kernels' parallel jobs in OpenMP regions (on torch's threads) instead of on the work pool; returns
    the previous setting. For models whose dense linears run in torch: one set of threads, not two."""
    lib = _lib()
    return False if lib is None else bool(lib.ki_work_pool_use_openmp(int(on)))


def variant() -> str | None:
    """The loaded library's kernel variant (``avx512``, ``avx2``, ``scalar``), None without one."""
    lib = _lib()
    return None if lib is None else VARIANT_NAMES[lib.ki_variant()]


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as 2-D ``[rows, width]`` with unit stride along the rows (a view when possible)."""
    if x.dim() != 2 or x.shape[1] != width:
        x = x.reshape(-1, width)
    return x if x.stride(1) == 1 else x.contiguous()


def _cache_code(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The dtype code of a K/V cache pair (``--kv-cache-dtype``: any dtype the kernels know, whatever the
    activations')."""
    if k_cache.dtype not in DTYPE_CODES or v_cache.dtype != k_cache.dtype:
        raise ValueError("the K and V caches must be of one dtype the kernels know")
    return DTYPE_CODES[k_cache.dtype]


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"CPU kernel {name} rejected its arguments (status {status})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)`` (new tensors, inputs untouched)."""
    hidden = x.shape[-1]
    rows = _rows(x, hidden)
    out = torch.empty(rows.shape, dtype=x.dtype)
    summed = res = None
    if residual is not None:
        res = _rows(residual, hidden)
        summed = torch.empty(rows.shape, dtype=x.dtype)
    if weight.dtype != x.dtype or not weight.is_contiguous():
        weight = weight.to(x.dtype).contiguous()
    _check(_lib().ki_rms_norm(
        DTYPE_CODES[x.dtype], rows.data_ptr(), rows.stride(0), None if res is None else res.data_ptr(),
        0 if res is None else res.stride(0), None if summed is None else summed.data_ptr(),
        0 if summed is None else summed.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), rows.shape[0],
        hidden, eps), "rms_norm")
    if x.dim() != 2:
        out = out.view(x.shape)
        summed = None if summed is None else summed.view(x.shape)
    return out if summed is None else (out, summed)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2 * d]``."""
    d = x.shape[-1] // 2
    rows = _rows(x, 2 * d)
    out = torch.empty(rows.shape[0], d, dtype=x.dtype)
    _check(_lib().ki_silu_and_mul(DTYPE_CODES[x.dtype], rows.data_ptr(), rows.stride(0), out.data_ptr(),
                                  out.stride(0), rows.shape[0], d), "silu_and_mul")
    return out.view(*x.shape[:-1], d)


def rotary_and_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """RoPE on q and k, k and v written to their cache slots (slot < 0: skipped); returns the rotated q
    ``[T, num_heads, head_dim]``. ``q``/``k``/``v`` may be row views of one fused QKV output."""
    q2, k2, v2 = _rows(q, num_heads * head_dim), _rows(k, num_kv_heads * head_dim), _rows(v, num_kv_heads * head_dim)
    positions = positions.to(torch.int64).contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    table = cos_sin_cache.to(torch.float32).contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    out = torch.empty(q2.shape[0], num_heads, head_dim, dtype=q.dtype)
    _check(_lib().ki_rotary_and_store(
        DTYPE_CODES[q.dtype], _cache_code(k_cache, v_cache), q2.data_ptr(), q2.stride(0), k2.data_ptr(), k2.stride(0), v2.data_ptr(), v2.stride(0),
        positions.data_ptr(), table.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        slots.data_ptr(), q2.shape[0], num_heads, num_kv_heads, head_dim), "rotary_and_store")
    return out


# A job on the work pool costs a wake-up of each sleeping helper (~45 us on a VM; nothing while they spin
# within a step): about the time one core streams 1 MiB of weights.
# Smaller matmuls run on fewer threads, and batch-1 decode wakes the pool less often.
LINEAR_BYTES_PER_THREAD = 1 << 20


def linear_threads(rows: int, out_features: int, in_features: int, element_size: int) -> int:
    work = out_features * in_features * element_size * max(1, rows // 4)  # weight bytes, more with more rows
    return max(1, min(torch.get_num_threads(), work // LINEAR_BYTES_PER_THREAD))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           num_threads: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for small batches: weights ``[N, K]`` (contiguous, x's dtype) streamed
    once, fp32 accumulation, output rounded to x's dtype. ``x`` may have any leading dimensions."""
    in_features = x.shape[-1]
    rows = _rows(x, in_features)
    out_features = weight.shape[0]
    if weight.dtype != x.dtype or not weight.is_contiguous() or weight.shape[1] != in_features:
        raise ValueError("linear needs a contiguous [out, in] weight of the input's dtype")
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype)
    _check(_lib().ki_linear(
        DTYPE_CODES[x.dtype], rows.data_ptr(), rows.stride(0), weight.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), rows.shape[0], out_features,
        in_features, num_threads or linear_threads(rows.shape[0], out_features, in_features, x.element_size())),
        "linear")
    return out.view(*x.shape[:-1], out_features)


def paged_decode_attention(query: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> None:
    """For each decode i: ``out[rows[i]] = attention(query[rows[i]], its context)``, reading K/V through
    ``block_tables[i]`` (int32) for ``seq_lens[i]`` (int32) positions. ``query``/``out``: ``[T, heads, head_dim]``."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if not (query.is_contiguous() and out.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_decode_attention needs contiguous query, output and caches")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 or rows.dtype != torch.int64:
        raise ValueError("block_tables and seq_lens must be int32, rows int64")
    _check(_lib().ki_paged_decode_attention(
        DTYPE_CODES[query.dtype], _cache_code(k_cache, v_cache), query.data_ptr(), query.stride(0), out.data_ptr(), out.stride(0), rows.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
        seq_lens.data_ptr(), rows.shape[0], num_heads, num_kv_heads, head_dim, block_size, scale,
        attention_threads(rows.shape[0], num_kv_heads)), "paged_decode_attention")


def attention_threads(sequences: int, kv_heads: int) -> int:
    """Threads for a decode attention call: no more than its work items (a sequence each, or a sequence and KV
    head when there are fewer sequences than threads: batch 1 splits by KV head), so none wakes up idle."""
    threads = torch.get_num_threads()
    return max(1, min(threads, sequences if sequences >= threads else sequences * kv_heads))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of float32 rows ``[S, vocab]`` (unit stride along the vocab), int64: the first
    maximal index, the first NaN where a row has one, exactly as torch."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1 or logits.shape[1] < 1:
        raise ValueError("argmax_rows needs float32 rows [S, vocab] with unit stride along the vocab")
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _check(_lib().ki_argmax_rows(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1],
                                 out.data_ptr()), "argmax_rows")
    return out
