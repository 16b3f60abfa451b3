"""RMSNorm, with the residual add fused in (the decoder layer's pattern)."""

from __future__ import annotations

import torch
from kubeinfer.engine.layers import ops
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)`` (see ``ops.rms_norm``)."""
        return ops.rms_norm(x, self.weight, self.eps, residual)
