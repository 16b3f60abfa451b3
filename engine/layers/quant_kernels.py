"""The quantized CPU matmuls (``engine/csrc/quant_kernels.cpp``) as functions on torch tensors.

The library is compiled without ``-march``: its AVX2 and AVX-512 VNNI paths are compiled under GCC target
pragmas and picked at run time from the CPU's features, so one build serves every x86 CPU and the paths a
CPU lacks still compile everywhere. ``KUBEINFER_QUANT_ISA=scalar|avx2|avx512`` (or ``set_isa``) caps the
path, to test the fallbacks. Activations are float32 (weights dequantised in registers: the dense result
up to rounding order) or quantized to int8 per block of 32 as llama.cpp does (``q8``: int8 dot products, the
default for GGUF formats where the int8 panel GEMM runs (x86 with AVX2); ``KUBEINFER_QUANT_ACTIVATIONS=f32|q8`` overrides
``default_activations``). Weights are ``uint8 [N, row_bytes]`` rows of GGUF blocks (ggml's type codes),
or ``int8 [N, K]`` rows with float32 per-row scales (``INT8_ROW``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from kubeinfer.engine import cpu_features
from kubeinfer.engine.csrc import build
from kubeinfer.engine.layers import cpu_kernels

logger = logging.getLogger(__name__)

SOURCE = Path(build.__file__).with_name("quant_kernels.cpp")
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
ISA_ENV = "KUBEINFER_QUANT_ISA"
ACTIVATIONS_ENV = "KUBEINFER_QUANT_ACTIVATIONS"
ACTIVATION_MODES = {"f32": 0, "q8": 1}
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512_vnni", 3: "avx512_bf16"}
_ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512_vnni": 2, "avx512_bf16": 3}
_path_in_use = {"isa": 0}  # the library's kq_current_isa, mirrored by _lib and set_isa

# ggml type codes of the block formats the kernels read, and our int8-rows format
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, INT8_ROW = 2, 3, 6, 7, 8, 12, 13, 14, 100
GGUF_TYPES = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q5_0": Q5_0, "Q5_1": Q5_1, "Q8_0": Q8_0, "Q4_K": Q4_K, "Q5_K": Q5_K,
              "Q6_K": Q6_K}
TYPE_NAMES = {code: name for name, code in GGUF_TYPES.items()} | {INT8_ROW: "INT8"}  # (for logs and reports)
# (bytes, elements) of one block
BLOCKS = {Q4_0: (18, 32), Q4_1: (20, 32), Q5_0: (22, 32), Q5_1: (24, 32), Q8_0: (34, 32), Q4_K: (144, 256),
          Q5_K: (176, 256), Q6_K: (210, 256), INT8_ROW: (32, 32)}
# Packed int8 panels (engine/csrc/packed_panels.h): these formats' rows repacked once, at load, in the order the
# int8 tiles read them (same bytes, same [N, row_bytes] shape); their type code is the format's | PACKED.
PACKED = 256  # (kq_packed_bit)
PACKABLE = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
PANEL_ROWS = 32
BLOCKS |= {qtype | PACKED: BLOCKS[qtype] for qtype in PACKABLE}

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "kq_supported_isa": ([], _INT),
    "kq_set_isa": ([_INT], _INT),
    "kq_current_isa": ([], _INT),
    "kq_set_panel_min_rows": ([_I64], _I64),
    "kq_set_wide_min_rows": ([_I64], _I64),
    "kq_row_bytes": ([_INT, _I64], _I64),
    "kq_matmul": ([_INT, _P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT, _INT], _INT),
    "kq_matmul_bf16": ([_INT, _P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT, _INT], _INT),
    "kq_set_bf16_min_rows": ([_I64], _I64),
    "kq_set_q8_panel_min_rows": ([_I64], _I64),
    "kq_dequantize_rows": ([_INT, _P, _I64, _P, _I64, _I64, _P], _INT),
    "kq_pack_panels": ([_INT, _P, _I64, _I64, _I64, _P], _INT),
    "kq_packed_bit": ([], _INT),
    "kq_set_packed_expand_min_rows": ([_INT, _I64], _I64),
    "kq_embedding": ([_INT, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _P, _INT, _INT], _INT),
    "kq_use_work_pool": ([_P], _INT),
}


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\n".join([build.source_text(SOURCE), compiler, *FLAGS]).encode()).hexdigest()
    target = build.cache_dir() / f"kubeinfer_quant_{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:  # built beside the target and renamed: concurrent processes never load a half-written file
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True,
                       text=True)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@cache
def _lib() -> ctypes.CDLL | None:
    compiler = build._compiler()
    if compiler is None:
        logger.warning("no C++ compiler found: quantized CPU kernels unavailable")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("building the quantized CPU kernels failed: %s", detail.strip()[-2000:])
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    shared_pool = cpu_kernels.work_pool_run()
    if shared_pool is not None:  # one set of helper threads for both libraries
        lib.kq_use_work_pool(shared_pool)
    if lib.kq_packed_bit() != PACKED:
        raise RuntimeError(f"quantized CPU kernels mark packed types with {lib.kq_packed_bit()}, not {PACKED}")
    if not cpu_features.quantized_bf16_dot():  # slower than widening to float32 on this CPU: never
        lib.kq_set_bf16_min_rows(1 << 40)
    requested = os.environ.get(ISA_ENV, "").strip().lower()
    if requested:
        if requested not in _ISA_CODES:
            raise ValueError(f"{ISA_ENV}={requested!r}: expected one of scalar, avx2, avx512")
        lib.kq_set_isa(_ISA_CODES[requested])
    _path_in_use["isa"] = lib.kq_current_isa()
    return lib


def available() -> bool:
    return _lib() is not None


def supported_isa() -> str:
    return ISA_NAMES[_lib().kq_supported_isa()]


def current_isa() -> str:
    return ISA_NAMES[_lib().kq_current_isa()]


def set_isa(name: str) -> str:
    """Use at most ``name`` (scalar, avx2, avx512, avx512_bf16; capped at what the CPU supports); returns the
    path in use. ``avx512`` is the VNNI path without the bf16 dot products."""
    _path_in_use["isa"] = _lib().kq_set_isa(_ISA_CODES[name])
    return ISA_NAMES[_path_in_use["isa"]]


def set_panel_min_rows(rows: int) -> int:
    """Float32-activation calls with at least ``rows`` rows use the panel GEMM (dequantise, then a tiled
    float32 GEMM); fewer decode in registers. Returns the previous threshold (benchmarks, tests)."""
    return _lib().kq_set_panel_min_rows(rows)


def set_wide_min_rows(rows: int) -> int:
    """Panel GEMM calls with at least ``rows`` rows dequantise wide, k-major panels (an outer-product
    micro-kernel; the transpose pays off from many rows on). Returns the previous threshold."""
    return _lib().kq_set_wide_min_rows(rows)


def set_bf16_min_rows(rows: int) -> int:
    """bfloat16-activation calls with at least ``rows`` rows use the AVX-512 BF16 panels (where the CPU has
    them); fewer are widened to float32. Returns the previous threshold (benchmarks, tests)."""
    return _lib().kq_set_bf16_min_rows(rows)


def set_q8_panel_min_rows(rows: int) -> int:
    """int8-activation calls with at least ``rows`` rows use the int8 panel GEMM (AVX2 or AVX-512 VNNI); fewer
    take the dot products of the rows path. Returns the previous threshold (benchmarks, tests)."""
    return _lib().kq_set_q8_panel_min_rows(rows)


def set_packed_expand_min_rows(qtype: int, rows: int) -> int:
    """Calls on packed K-quant panels (``qtype`` Q4_K, Q5_K or Q6_K) with at least ``rows`` rows expand each panel
    once into bytes and float scales for the int8 tiles; fewer decode the packed nibbles in every tile. Returns
    the previous threshold (benchmarks, tests)."""
    previous = _lib().kq_set_packed_expand_min_rows(qtype, rows)
    if previous < 0:
        raise ValueError(f"type {qtype} has no expanded packed panels")
    return previous


def has_bf16_dot() -> bool:
    """Whether this CPU has the bf16 dot-product path (AVX-512 BF16); the engine uses it only where it is the
    faster one (``cpu_features.quantized_bf16_dot``: else the threshold is set to never)."""
    _lib()
    return _path_in_use["isa"] >= _ISA_CODES["avx512_bf16"]


# The float32-activation paths, and the row thresholds (panel from, wide panels from) that force each at every
# row count: decoded in registers, the panel GEMM's dot-product tiles, its wide k-major panels.
F32_PATHS = {"decode": (1 << 40, 1 << 40), "panel": (1, 1 << 40), "wide": (1, 1)}


# The int8-activation paths, and the row threshold (int8 panels from) that forces each: dot products of the rows
# (one activation row against four weight rows at a time, or four against one), or the int8 panel GEMM.
Q8_PATHS = {"rows": 1 << 40, "panel": 1}


@contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Float32-activation calls inside take ``path`` (a key of ``F32_PATHS``) whatever their rows
    (benchmarks, tests); the thresholds are restored after."""
    panel_from, wide_from = F32_PATHS[path]
    previous = set_panel_min_rows(panel_from), set_wide_min_rows(wide_from)
    try:
        yield
    finally:
        set_panel_min_rows(previous[0])
        set_wide_min_rows(previous[1])


@contextmanager
def forced_q8_path(path: str) -> Iterator[None]:
    """int8-activation calls inside take ``path`` (a key of ``Q8_PATHS``) whatever their rows."""
    previous = set_q8_panel_min_rows(Q8_PATHS[path])
    try:
        yield
    finally:
        set_q8_panel_min_rows(previous)


# The paths of packed K-quant calls, and the row threshold (expanded panels from) that forces each: the packed
# tiles, which decode the nibbles and scales in every tile of rows, or each panel expanded once for all rows.
PACKED_PATHS = {"tiles": 1 << 40, "expanded": 1}


@contextmanager
def forced_packed_path(qtype: int, path: str) -> Iterator[None]:
    """Calls on packed ``qtype`` (a K-quant) panels inside take ``path`` (a key of ``PACKED_PATHS``)."""
    previous = set_packed_expand_min_rows(qtype, PACKED_PATHS[path])
    try:
        yield
    finally:
        set_packed_expand_min_rows(qtype, previous)


@cache
def _activations_override() -> str | None:
    mode = os.environ.get(ACTIVATIONS_ENV, "").strip().lower() or None
    if mode not in (None, *ACTIVATION_MODES):
        raise ValueError(f"{ACTIVATIONS_ENV}={mode!r}: expected f32 or q8")
    return mode


def default_activations(qtype: int, rows: int = 1) -> str:
    """How a matmul of ``rows`` activation rows with weights in ``qtype`` multiplies when the caller does not say:
    ``$KUBEINFER_QUANT_ACTIVATIONS`` when set; else ``q8`` for the GGUF block formats where the int8 panel GEMM
    runs (AVX-512 VNNI: 1.9-2.6x the float32 GEMM from 16 rows on; AVX2: 1.2-1.7x, and 1.4-1.7x at one row), the
    arithmetic of llama.cpp's CPU backend and of vLLM's GGUF kernels, which quantize activations to int8 per block
    of 32 too; ``f32`` otherwise: for ``INT8_ROW`` (weight-only int8), and for Q8_0 on AVX2 from two rows on,
    where the split int8 products lose to the float32 panels (``bench/quant_matmul.py --format Q8_0``, Zen 3:
    0.75-0.84x from 8 rows, and the int8 GEMV's 1.5x holds at one row only; e.g. the Q8_0 LM head of a batch)."""
    if qtype & PACKED:
        return "q8"  # (packed panels feed the int8 tiles only)
    override = _activations_override()
    if override is not None:
        return override
    fast_int8 = cpu_features.quantized_int8_panels() and has_int8_panels()  # (the flags may fake a lesser CPU)
    if qtype == INT8_ROW or not fast_int8:
        return "f32"
    # Q8_0's 8-bit codes: without vpdpbusd its int8 products are split into nibbles (so that vpmaddubsw's int16
    # pair sums cannot saturate), twice the work of a 4-bit format's
    if qtype == Q8_0 and rows >= 2 and not (cpu_features.quantized_vnni_int8()
                                             and _path_in_use["isa"] >= _ISA_CODES["avx512_vnni"]):
        return "f32"
    return "q8"


def packs_panels(qtype: int) -> bool:
    """Whether the engine keeps weights of ``qtype`` as packed int8 panels here: a packable format whose matmuls
    take int8 activations at every row count on this CPU (default_activations), on a path with int8 tiles."""
    return (qtype in PACKABLE and has_int8_panels()
            and default_activations(qtype, 1) == default_activations(qtype, 2) == "q8")


def pack_panels(qtype: int, weight: torch.Tensor, k: int) -> torch.Tensor:
    """``weight``'s rows (``uint8 [N, row_bytes]``, ``N`` a multiple of ``PANEL_ROWS``) repacked as int8 panels,
    in a new tensor of the same shape: multiply it as ``qtype | PACKED`` (int8 activations only)."""
    weight = weight.contiguous()
    packed = torch.empty_like(weight)
    _check(_lib().kq_pack_panels(qtype, weight.data_ptr(), weight.shape[1], weight.shape[0], k, packed.data_ptr()),
           "pack_panels")
    return packed


def has_int8_panels() -> bool:
    """Whether int8-activation calls get the int8 panel GEMM here (the kernel path is AVX2 or better).
    Read from the path kept on this side, not asked of the library: a recorded decode step logs every call."""
    _lib()
    return _path_in_use["isa"] >= _ISA_CODES["avx2"]


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of ``k`` weights in ``qtype`` (ValueError when ``k`` is not a whole number of blocks)."""
    block_bytes, block_elems = BLOCKS[qtype]
    if k % block_elems:
        raise ValueError(f"{k} input features are not a whole number of {block_elems}-element blocks")
    return k // block_elems * block_bytes


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"quantized CPU kernel {name} rejected its arguments (status {status})")


def _scales_ptr(weight: torch.Tensor, scales: torch.Tensor | None) -> int | None:
    """The scales' pointer (None for formats without); weights and scales are read as contiguous rows."""
    if not weight.is_contiguous() or (scales is not None and not scales.is_contiguous()):
        raise ValueError("weights and scales must be contiguous")
    return None if scales is None else scales.data_ptr()


def matmul(x: torch.Tensor, qtype: int, weight: torch.Tensor, k: int, scales: torch.Tensor | None = None,
           out: torch.Tensor | None = None, activations: str | None = None) -> torch.Tensor:
    """``x [M, k] @ W.T`` for ``W`` the ``N`` quantized rows in ``weight`` (``uint8/int8 [N, row_bytes]``);
    writes ``out`` (``[M, N]`` in x's dtype, any row stride; e.g. a column slice of a wider output) when given.
    x is float32 or bfloat16 (the bf16 dtype: the result rounded to bf16; bf16 dot products from
    ``set_bf16_min_rows`` rows on where the CPU has AVX-512 BF16). ``activations``: ``f32`` or ``q8`` (default:
    ``default_activations(qtype, M)``)."""
    m, width = x.shape  # (a ValueError for a tensor that is not 2-D)
    mode = ACTIVATION_MODES[activations or default_activations(qtype, m)]
    if x.dtype not in (torch.float32, torch.bfloat16) or width != k or x.stride(1) != 1:
        raise ValueError("matmul needs a float32 or bfloat16 [M, k] input with unit stride along k")
    n, wbytes = weight.shape
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype)
    elif out.dtype != x.dtype or out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be {x.dtype} [M, N] with unit stride along N")
    kernel = _lib().kq_matmul if x.dtype == torch.float32 else _lib().kq_matmul_bf16
    _check(kernel(qtype, weight.data_ptr(), wbytes, _scales_ptr(weight, scales), x.data_ptr(), x.stride(0),
                  out.data_ptr(), out.stride(0), m, n, k, mode, torch.get_num_threads()), "matmul")
    return out


def dequantize(qtype: int, weight: torch.Tensor, k: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 ``[N, k]`` values of quantized rows (embedding lookups; tests)."""
    weight = weight.contiguous()
    scales = None if scales is None else scales.contiguous()
    out = torch.empty(weight.shape[0], k, dtype=torch.float32)
    _check(_lib().kq_dequantize_rows(qtype, weight.data_ptr(), weight.shape[1],
                                     None if scales is None else scales.data_ptr(), weight.shape[0], k,
                                     out.data_ptr()), "dequantize_rows")
    return out


def embedding(qtype: int, weight: torch.Tensor, k: int, scales: torch.Tensor | None, ids: torch.Tensor,
              first_row: int, out: torch.Tensor, clear_outside: bool) -> torch.Tensor:
    """``out[i]`` = the row ``ids[i] - first_row`` of ``weight``'s rows (float32, or rounded to ``out``'s
    bfloat16), for the ids it holds; the others are left as they are (zeroed when ``clear_outside``). One kernel
    call, so a recorded decode step replays it."""
    if ids.dtype != torch.int64 or ids.dim() != 1 or not ids.is_contiguous():
        raise ValueError("ids must be a contiguous int64 vector")
    if out.dtype not in (torch.float32, torch.bfloat16) or out.shape != (ids.shape[0], k) or not out.is_contiguous():
        raise ValueError("out must be contiguous float32 or bfloat16 [len(ids), k]")
    _check(_lib().kq_embedding(qtype, weight.data_ptr(), weight.shape[1], _scales_ptr(weight, scales), ids.data_ptr(),
                               ids.shape[0], first_row, weight.shape[0], k, out.data_ptr(), int(clear_outside),
                               int(out.dtype == torch.bfloat16)), "embedding")
    return out
