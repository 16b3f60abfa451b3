"""Fused RMSNorm (+ residual add) in Triton: one pass over each row instead of four torch kernels.

Same arithmetic and roundings as ``norm.RMSNorm`` (and transformers): the residual sum is rounded
to the input dtype, normalised in fp32, rounded back to the input dtype, then scaled by the weight
(product rounded to the input dtype)::

    rms_norm(x, weight, eps)                -> norm(x)
    rms_norm(x, weight, eps, residual=r)    -> (norm(x + r), x + r)

Inputs are ``[..., hidden]`` with a contiguous last dimension; one program normalises one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    sum_ptr,  # residual-sum output (HAS_RESIDUAL only)
    x_ptr,
    residual_ptr,
    weight_ptr,
    x_stride,
    residual_stride,
    out_stride,
    sum_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_stride + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / hidden + eps)
    normed = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * normalise(x [+ residual])``; with ``residual`` also returns the sum (the next residual)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    rows_x = _rows(x)
    out = torch.empty(rows_x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows_r = _rows(residual) if residual is not None else rows_x
    total = torch.empty_like(rows_x) if residual is not None else out
    if rows_x.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows_x.shape[0],)](
            out,
            total,
            rows_x,
            rows_r,
            weight,
            rows_x.stride(0),
            rows_r.stride(0),
            out.stride(0),
            total.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    out = out.view(x.shape)
    return out if residual is None else (out, total.view(x.shape))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, hidden]`` with unit stride along hidden (a copy only when it must)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])
