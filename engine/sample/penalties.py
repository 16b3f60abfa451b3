"""Repetition, frequency and presence penalties on a batch of logits (vLLM's semantics).

Repetition divides positive / multiplies negative logits of every token seen in the prompt or the
output; frequency subtracts ``penalty * count`` and presence ``penalty * (count > 0)``, counting output
tokens only.
"""

from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """``logits`` [S, V]; ``prompt_mask`` [S, V] bool; ``output_counts`` [S, V] float; penalties [S]."""
    seen = prompt_mask | (output_counts > 0)
    rep = repetition.unsqueeze(1).expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency.unsqueeze(1) * output_counts
    return logits - presence.unsqueeze(1) * (output_counts > 0).to(logits.dtype)
