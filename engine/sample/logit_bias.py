"""OpenAI's ``logit_bias`` (token id -> additive bias in [-100, 100]), applied to a batch in one scatter."""

from __future__ import annotations

import torch


def bias_tensors(logit_bias: dict[int, float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's bias as (token ids int64 [k], values float32 [k])."""
    ids = torch.tensor(list(logit_bias), dtype=torch.long, device=device)
    values = torch.tensor(list(logit_bias.values()), dtype=torch.float32, device=device)
    return ids, values


def apply_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add ``biases[i]`` to ``logits[rows[i]]`` in place (one ``index_put_`` for the whole batch)."""
    counts = torch.tensor([ids.numel() for ids, _ in biases], device=logits.device)
    row_index = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long, device=logits.device), counts)
    token_index = torch.cat([ids for ids, _ in biases])
    values = torch.cat([v for _, v in biases]).to(logits.dtype)
    logits.index_put_((row_index, token_index), values, accumulate=True)
