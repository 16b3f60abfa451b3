"""Fused SiLU-and-mul in Triton: the gated MLP's ``silu(gate) * up`` in one pass.

Input ``[..., 2 * d]`` holds ``gate`` then ``up`` (the merged gate/up projection's layout);
output ``[..., d]``. Same roundings as ``F.silu(gate) * up`` in torch: SiLU in fp32, rounded to
the input dtype, then the product in fp32, rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, x_stride, out_stride, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2 * d]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dimension must be even (gate and up halves), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    rows = (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, 2 * d)
    out = torch.empty(rows.shape[0], d, dtype=x.dtype, device=x.device)
    if rows.shape[0] and d:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
            out, rows, rows.stride(0), out.stride(0), d, BLOCK=block, num_warps=4 if block >= 512 else 1
        )
    return out.view(*x.shape[:-1], d)
