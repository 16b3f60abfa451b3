"""One sequence's sampling state, owned by the ``Sampler`` and keyed by sequence id there."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kubeinfer.engine.sample.constraints import TokenConstraint
from kubeinfer.engine.sampling_params import SamplingParams


@dataclass
class SequenceSamplingState:
    params: SamplingParams
    prompt_token_ids: list[int]
    generator: torch.Generator | None = None  # seeded requests only
    constraints: list[TokenConstraint] = field(default_factory=list)
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, values)
    # Penalty tensors, made at the first penalised sample and kept up to date in O(1) per token.
    prompt_mask: torch.Tensor | None = None  # [vocab] bool
    output_counts: torch.Tensor | None = None  # [vocab] float32
    num_output_tokens: int = 0  # tokens recorded so far

    def penalty_tensors(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prompt_mask is None or self.output_counts is None:
            prompt = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device).clamp_(0, vocab_size - 1)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.prompt_mask[prompt] = True
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        return self.prompt_mask, self.output_counts

    def record(self, token_id: int) -> None:
        """The token just sampled: penalty counts (when kept) and every constraint follow it."""
        self.num_output_tokens += 1
        if self.output_counts is not None and 0 <= token_id < self.output_counts.shape[0]:
            self.output_counts[token_id] += 1.0
        for constraint in self.constraints:
            constraint.accept_token(token_id)

    def fork(self, index: int, device: torch.device) -> SequenceSamplingState:
        """A sibling's state (``n > 1``, before any token): its own generator (seed + index) and constraints."""
        child = SequenceSamplingState(self.params, self.prompt_token_ids,
                                      generator=make_generator(self.params, index, device),
                                      constraints=[c.fork() for c in self.constraints], logit_bias=self.logit_bias,
                                      num_output_tokens=self.num_output_tokens)
        if self.prompt_mask is not None and self.output_counts is not None:
            child.prompt_mask, child.output_counts = self.prompt_mask, self.output_counts.clone()
        return child


def make_generator(params: SamplingParams, index: int, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed + index)
    return generator
