"""Top-k / top-p / min-p filters and the draw, batched over rows."""

from __future__ import annotations

import torch
from kubeinfer.engine.layers import ops


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)``: through the C++ kernel for float32 rows on the CPU (torch's reduction takes
    ~0.66 ms for 32 rows of a 49K vocabulary on one thread, a serial part of every step), else torch."""
    kernels = ops.cpu_kernel_module() if logits.device.type == "cpu" else None
    if kernels is not None and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1:
        return kernels.argmax_rows(logits)
    return logits.argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask everything outside each row's top-k / top-p set with -inf (ties at the k-th value stay in).

    The sort is stable, so among tied logits the lowest token id comes first, as in ``argmax``: the token
    that top-p always keeps is the greedy one (bf16 logits tie often), and a tiny top_p is greedy."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1).sub_(probs)  # the mass of the tokens ranked above each one
        outside = before >= top_p.unsqueeze(1)
        outside[:, 0] = False  # the most likely token always stays
        sorted_logits.masked_fill_(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens less likely than ``min_p`` times the row's most likely one."""
    top = probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < min_p.unsqueeze(1) * top, 0.0)


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None] | None) -> torch.Tensor:
    """Sample one token per row: argmax(p / q) with q ~ Exp(1) is a draw from p. A row with a generator
    draws from it alone, so a seeded request reproduces whatever it is batched with."""
    q = torch.empty_like(probs)
    if generators is None:
        q.exponential_()
    else:
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            q[unseeded] = torch.empty_like(q[unseeded]).exponential_()
        for i, g in enumerate(generators):
            if g is not None:
                q[i].exponential_(generator=g)
    return probs.div_(q).argmax(dim=-1)
