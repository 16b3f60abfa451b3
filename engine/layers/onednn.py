"""oneDNN's prepacked linear layers for the CPU.

``F.linear`` on the CPU calls MKL's sgemm for float32, which on non-Intel CPUs takes generic code
paths; oneDNN picks its kernels by CPU features instead, and a weight reordered once into its blocked
layout saves the per-call reorder. bench: SmolLM2's decode matmuls at batch 32 on a 2-core AMD EPYC
ran 2.5-3.2x faster in float32 and 1.3-1.8x in bfloat16 (bench/RESULTS.md). Float16 stays on
``F.linear``, and ``KUBEINFER_KERNELS=torch`` turns packing off. oneDNN packs bfloat16 only on CPUs
with AVX-512 BW/VL/DQ or AVX-NE-CONVERT (``cpu_features.onednn_packs_bf16``); elsewhere bfloat16
weights are left to the other CPU paths.
"""

from __future__ import annotations

import logging
import os

import torch
from kubeinfer.engine import cpu_features
from kubeinfer.engine.layers.ops import KERNELS_ENV
from torch import nn

logger = logging.getLogger(__name__)

BATCH_HINT = 32  # the decode batch oneDNN tunes the layout for; any batch size works


def available() -> bool:
    return (os.environ.get(KERNELS_ENV, "").strip().lower() != "torch" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def packs(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether oneDNN can prepack weights of ``dtype`` on this CPU (or on one with ``flags``)."""
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and cpu_features.onednn_packs_bf16(flags)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` reordered into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the packed weight; ``x`` may have any leading dimensions."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def prepack_model(model: nn.Module) -> int:
    """Pack the weight of every module that has a ``packed_weight`` slot (CPU float32/bfloat16 only);
    returns how many were packed. Call it after the weights are loaded."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "packed_weight") or weight is None or getattr(module, "quantized", None) is not None:
            continue  # no slot, or a weight kept quantized
        if weight.device.type != "cpu" or not packs(weight.dtype):
            continue
        try:
            module.packed_weight = pack(weight)
        except RuntimeError as exc:  # an unusual shape or a torch build without oneDNN: keep F.linear
            logger.warning("oneDNN could not pack %s: %s", type(module).__name__, exc)
            continue
        count += 1
    return count
