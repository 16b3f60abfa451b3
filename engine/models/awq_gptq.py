"""AWQ and GPTQ 4-bit Hugging Face checkpoints: their ``quantization_config`` read, and each quantized
linear's ``qweight``/``qzeros``/``scales``/``g_idx`` turned into one ``<module>.weight`` of Q4_1 rows
(``engine/layers/int4_repack.py``) that the quantized slots of ``prepare_model`` shard and multiply.

Supported: 4 bits; group sizes that are multiples of 32 (or -1, the whole input); AWQ's GEMM packing with
zero points; GPTQ v1 (stored zero = zero - 1, as AutoGPTQ writes) and ``checkpoint_format: gptq_v2``
(zeros as is), ``sym: true`` using the fixed zero 8 as vLLM's kernels do. GPTQ act-order (``desc_act``,
a ``g_idx`` that is not ``k // group_size``): the inputs are permuted once at load so that each group is
contiguous (``argsort(g_idx)``), and the layer keeps that permutation to gather its input before the matmul;
fused projections (q/k/v, gate/up) share it, as AutoGPTQ's do (one input, one Hessian order); a
row-parallel split of such a layer (tensor parallelism) is refused. Refused with ``UnsupportedQuantization``:
other bit widths, AWQ GEMV/Marlin packings. Layers listed in ``modules_to_not_convert`` arrive as dense
``.weight`` tensors and load dense.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubeinfer.engine.layers.int4_repack import awq_to_q4_1, gptq_to_q4_1
from kubeinfer.engine.layers.quantization import QuantizedRows, UnsupportedQuantization

INT4_METHODS = ("awq", "gptq")
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Int4Spec:
    """What the repack needs from a checkpoint's ``quantization_config``."""

    method: str  # awq | gptq
    group_size: int  # -1: the whole input
    zero_offset: int = 0  # GPTQ v1: stored zeros are zero - 1
    fixed_zero: int | None = None  # GPTQ sym: every zero is 8


def quantization_config(path: Path, raw_config: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's quantization config: config.json's ``quantization_config``, else AutoGPTQ's separate
    ``quantize_config.json`` (GPTQ unless it names another method); None when unquantized."""
    if raw_config.get("quantization_config"):
        return raw_config["quantization_config"]
    separate = path / "quantize_config.json"
    if separate.is_file():
        return {"quant_method": "gptq", **json.loads(separate.read_text())}
    return None


def checkpoint_method(qc: dict[str, Any] | None) -> str | None:
    """The ``quant_method`` of a quantization config (lower case), None when unquantized."""
    return None if not qc else str(qc.get("quant_method", "unknown")).lower()


def parse_spec(qc: dict[str, Any]) -> Int4Spec:
    """An AWQ or GPTQ ``quantization_config`` → ``Int4Spec``; UnsupportedQuantization for what the kernels
    cannot run."""
    method = str(qc.get("quant_method", "")).lower()
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method not in INT4_METHODS:
        raise UnsupportedQuantization(f"quantization_config.quant_method {method!r}: expected awq or gptq")
    if bits != 4:
        raise UnsupportedQuantization(f"{method} with {bits} bits is not supported: only 4-bit")
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        raise UnsupportedQuantization(f"{method} group_size {group_size} is not supported: the CPU kernels need "
                                      "a multiple of 32 (or -1)")
    if qc.get("lm_head"):
        raise UnsupportedQuantization(f"{method} with a quantized lm_head is not supported")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedQuantization(f"AWQ version {version!r} is not supported: only the GEMM packing")
        if not qc.get("zero_point", True):
            raise UnsupportedQuantization("AWQ without zero points (zero_point: false) is not supported")
        return Int4Spec("awq", group_size)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedQuantization(f"GPTQ checkpoint_format {fmt!r} is not supported: gptq or gptq_v2")
    return Int4Spec("gptq", group_size, zero_offset=1 if fmt == "gptq" else 0,
                    fixed_zero=8 if qc.get("sym", True) else None)


def act_order_perm(name: str, g_idx: torch.Tensor, k: int, group_size: int) -> torch.Tensor | None:
    """None for the trivial ``g_idx = k // group``; else the input order that makes each group contiguous."""
    group = k if group_size == -1 else group_size
    trivial = torch.arange(k, dtype=torch.int64) // group
    g = g_idx.to(torch.int64)
    if g.shape != (k,):
        raise UnsupportedQuantization(f"{name}: g_idx of shape {tuple(g.shape)} for {k} input features")
    if torch.equal(g, trivial):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], trivial):
        raise UnsupportedQuantization(f"{name}: act-order g_idx does not give every group {group} inputs")
    return perm


def repack(name: str, parts: dict[str, torch.Tensor], spec: Int4Spec) -> QuantizedRows:
    """One linear's packed tensors → Q4_1 rows (errors name the module)."""
    try:
        if spec.method == "awq":
            return awq_to_q4_1(parts["qweight"], parts["qzeros"], parts["scales"], spec.group_size)
        k = 8 * parts["qweight"].shape[0]
        perm = act_order_perm(name, parts["g_idx"], k, spec.group_size) if "g_idx" in parts else None
        return gptq_to_q4_1(parts["qweight"], parts.get("qzeros"), parts["scales"], spec.group_size,
                            spec.zero_offset, spec.fixed_zero, perm)
    except UnsupportedQuantization:
        raise
    except ValueError as e:
        raise UnsupportedQuantization(f"{name}: {e}") from e


def iter_int4_weights(weights: Iterable[tuple[str, torch.Tensor]], spec: Int4Spec
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedRows]]:
    """``weights`` with every quantized linear's parts replaced by one ``<prefix>.weight`` of Q4_1 rows,
    yielded once its parts have arrived (the others pass through unchanged)."""
    required = {"qweight", "scales"} | ({"qzeros"} if spec.method == "awq" or spec.fixed_zero is None else set())
    expected = {"qweight", "qzeros", "scales"} | ({"g_idx"} if spec.method == "gptq" else set())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part not in _PARTS:
            yield name, tensor
            continue
        if prefix in done:
            raise ValueError(f"{spec.method} checkpoint: {name} appears twice")
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if expected <= parts.keys():
            done.add(prefix)
            yield f"{prefix}.weight", repack(prefix, pending.pop(prefix), spec)
    for prefix, parts in pending.items():  # e.g. GPTQ without g_idx: the trivial grouping
        if not required <= parts.keys():
            raise ValueError(f"{spec.method} checkpoint: {prefix} lacks {', '.join(sorted(required - parts.keys()))}")
        yield f"{prefix}.weight", repack(prefix, parts, spec)
