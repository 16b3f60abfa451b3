"""Which CPU matmul runs a linear layer, by batch size and dtype.

Measured with ``bench/linear.py`` on SmolLM2's shapes (bench/RESULTS.md): up to ``SMALL_BATCH_MAX_ROWS``
rows a linear only streams its weights, and the C++ small-batch kernel (``cpu_kernels.linear``, plain
``[N, K]`` weights, fp32 accumulation) beats oneDNN's packed fp32 at every shape, and in bf16 reads half
the bytes. Above that oneDNN's blocked GEMM wins where it has a packed weight. bf16 without a oneDNN
packing (AVX2-only CPUs) always takes the kernel: ``F.linear`` in bf16 is 1.5-3x slower there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kubeinfer.engine.layers import onednn, ops

SMALL_BATCH_MAX_ROWS = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def uses_kernel(rows: int, dtype: torch.dtype, packed: bool) -> bool:
    """Whether ``rows`` input rows of ``dtype`` go to the C++ kernel (``packed``: oneDNN holds a packed weight)."""
    return dtype in KERNEL_DTYPES and (rows <= SMALL_BATCH_MAX_ROWS or not packed)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the fastest CPU path for this batch (``packed``: oneDNN's copy or None)."""
    if x.device.type == "cpu" and weight.dtype == x.dtype and weight.is_contiguous():
        kernels = ops.cpu_kernel_module()
        if kernels is not None and uses_kernel(x.numel() // x.shape[-1], x.dtype, packed is not None):
            return kernels.linear(x, weight, bias)
    if packed is not None:
        return onednn.linear(x, packed, bias)
    return F.linear(x, weight, bias)
