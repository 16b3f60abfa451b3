"""The decoder layer's fused elementwise ops, dispatched by device.

Each op has a plain-torch reference here (the arithmetic of transformers, and the oracle of the
kernel tests); CUDA tensors use the Triton kernels and CPU tensors the C++ kernels when those load.
``KUBEINFER_KERNELS=torch`` forces the references everywhere (for debugging or bisecting a mismatch).
"""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F

KERNELS_ENV = "KUBEINFER_KERNELS"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)``. Normalised in float32,
    scaled in the input dtype, exactly like transformers."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@cache
def _fused_module(device_type: str) -> ModuleType | None:
    if os.environ.get(KERNELS_ENV, "").strip().lower() == "torch":
        return None
    if device_type == "cuda":
        try:
            from kubeinfer.engine.layers import triton_activation, triton_norm
        except ImportError:
            return None
        return _TritonOps(triton_norm, triton_activation)  # type: ignore[return-value]
    if device_type == "cpu":
        from kubeinfer.engine.layers import cpu_kernels

        return cpu_kernels if cpu_kernels.available() else None
    return None


def cpu_kernel_module() -> ModuleType | None:
    """The C++ CPU kernels (``layers/cpu_kernels``) when they load and ``KUBEINFER_KERNELS`` allows them."""
    return _fused_module("cpu")


class _TritonOps:
    """The Triton kernels under the names the CPU kernel module uses."""

    def __init__(self, norm: ModuleType, activation: ModuleType) -> None:
        self.rms_norm, self.silu_and_mul = norm.rms_norm, activation.silu_and_mul


def _fused(x: torch.Tensor) -> ModuleType | None:
    module = _fused_module(x.device.type)
    if module is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    fused = _fused(x)
    if fused is None or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps, residual)
    return fused.rms_norm(x, weight, eps, residual=residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    fused = _fused(x)
    return silu_and_mul_reference(x) if fused is None else fused.silu_and_mul(x)
