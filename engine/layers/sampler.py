"""The sampler: logits of the sequences that sample this step -> next tokens (+ logprobs).

Vectorised over the batch, with vLLM's semantics and order: penalties (repetition over prompt
and output, frequency/presence over output), ``min_tokens`` (EOS/stop ids masked), then greedy
rows take the argmax and random rows are scaled by temperature, filtered by top-k, top-p and
min-p, and drawn with the exponential race (argmax of p / Exp(1)) — per row from the request's
own ``torch.Generator`` when it has a seed, so a seeded request reproduces whatever it is
batched with. Logprobs are the model's raw log-softmax (vLLM's default ``raw_logprobs``).
When every row is plain greedy the whole sampler is one ``argmax``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kubeinfer.engine.sequence import Sequence


@dataclass
class PenaltyState:
    """Per-sequence tensors for the penalties, kept up to date in O(1) per new token."""

    prompt_mask: torch.Tensor  # [vocab] bool
    output_counts: torch.Tensor  # [vocab] float32


def get_penalty_state(seq: Sequence, vocab_size: int, device: torch.device) -> PenaltyState:
    state = seq.penalty_state
    if state is None:
        prompt = torch.tensor(seq.token_ids[: seq.num_prompt_tokens], dtype=torch.long, device=device)
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[prompt.clamp_(0, vocab_size - 1)] = True
        counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        outputs = seq.output_token_ids
        if outputs:
            ids = torch.tensor(outputs, dtype=torch.long, device=device)
            counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        state = seq.penalty_state = PenaltyState(mask, counts)
    return state


def record_token(seq: Sequence, token_id: int) -> None:
    state: PenaltyState | None = seq.penalty_state
    if state is not None and 0 <= token_id < state.output_counts.shape[0]:
        state.output_counts[token_id] += 1.0


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, built by ``SamplingBatch.build``."""

    greedy: torch.Tensor | None  # [S] bool, None when every row is greedy
    temperatures: torch.Tensor | None  # [S] float32 (1.0 on greedy rows)
    top_k: torch.Tensor | None  # [S] int64, vocab size = off
    top_p: torch.Tensor | None  # [S] float32
    min_p: torch.Tensor | None  # [S] float32
    generators: list[torch.Generator | None] | None
    prompt_mask: torch.Tensor | None  # [S, vocab]
    output_counts: torch.Tensor | None  # [S, vocab]
    presence: torch.Tensor | None
    frequency: torch.Tensor | None
    repetition: torch.Tensor | None
    suppress: list[tuple[int, list[int]]]  # (row, token ids) masked by min_tokens
    max_num_logprobs: int | None

    @property
    def all_greedy(self) -> bool:
        return self.greedy is None

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingBatch:
        params = [s.params for s in seqs]
        all_greedy = all(p.temperature == 0.0 for p in params)

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = temperatures = top_k = top_p = min_p = None
        generators = None
        if not all_greedy:
            greedy = tensor([p.temperature == 0.0 for p in params], torch.bool)
            temperatures = tensor([p.temperature or 1.0 for p in params], torch.float32)
            if any(p.top_k for p in params):
                top_k = tensor([min(p.top_k, vocab_size) or vocab_size for p in params], torch.long)
            if any(p.top_p < 1.0 for p in params):
                top_p = tensor([p.top_p for p in params], torch.float32)
            if any(p.min_p > 0.0 for p in params):
                min_p = tensor([p.min_p for p in params], torch.float32)
            if any(s.generator is not None for s in seqs):
                generators = [s.generator for s in seqs]

        prompt_mask = output_counts = presence = frequency = repetition = None
        if any(p.has_penalties for p in params):
            states = [get_penalty_state(s, vocab_size, device) for s in seqs]
            prompt_mask = torch.stack([st.prompt_mask for st in states])
            output_counts = torch.stack([st.output_counts for st in states])
            presence = tensor([p.presence_penalty for p in params], torch.float32)
            frequency = tensor([p.frequency_penalty for p in params], torch.float32)
            repetition = tensor([p.repetition_penalty for p in params], torch.float32)

        suppress = [(row, sorted(s.params.all_stop_token_ids)) for row, s in enumerate(seqs)
                    if s.num_output_tokens < s.params.min_tokens and s.params.all_stop_token_ids]
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(greedy, temperatures, top_k, top_p, min_p, generators, prompt_mask, output_counts,
                   presence, frequency, repetition, suppress, max(num_logprobs) if num_logprobs else None)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # With logprobs requested: top ids/values [S, k], and the sampled token's logprob and rank [S].
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    sampled_logprobs: list[float] | None = None
    sampled_ranks: list[int] | None = None


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    counts, mask = batch.output_counts, batch.prompt_mask
    assert counts is not None and mask is not None
    assert batch.repetition is not None and batch.frequency is not None and batch.presence is not None
    seen = mask | (counts > 0)
    rep = batch.repetition.unsqueeze(1).expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - batch.frequency.unsqueeze(1) * counts
    return logits - batch.presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask everything outside each row's top-k / top-p set with -inf (ties at the k-th value stay in)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        outside = cumulative <= (1.0 - top_p).unsqueeze(1)
        outside[:, -1] = False  # the most likely token always stays
        sorted_logits.masked_fill_(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None] | None) -> torch.Tensor:
    """Sample one token per row: argmax(p / q) with q ~ Exp(1) is a draw from p."""
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


class Sampler:
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw = logits
        if batch.output_counts is not None:
            logits = apply_penalties(logits, batch)
        if batch.suppress:
            logits = logits.clone() if logits is raw else logits
            for row, ids in batch.suppress:
                logits[row, ids] = float("-inf")

        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            assert batch.greedy is not None and batch.temperatures is not None
            greedy_ids = logits.argmax(dim=-1)
            scaled = logits / batch.temperatures.unsqueeze(1)
            if batch.top_k is not None or batch.top_p is not None:
                scaled = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
            probs = scaled.softmax(dim=-1)
            if batch.min_p is not None:
                top = probs.max(dim=-1, keepdim=True).values
                probs = probs.masked_fill(probs < batch.min_p.unsqueeze(1) * top, 0.0)
            random_ids = exponential_race(probs, batch.generators)
            token_ids = torch.where(batch.greedy, greedy_ids, random_ids)

        out = SamplerOutput(token_ids=token_ids.tolist())
        if batch.max_num_logprobs is not None:
            logprobs = raw.log_softmax(dim=-1)
            sampled = logprobs.gather(1, token_ids.unsqueeze(1))
            out.sampled_logprobs = sampled.squeeze(1).tolist()
            out.sampled_ranks = ((logprobs > sampled).sum(dim=-1) + 1).tolist()
            if batch.max_num_logprobs > 0:
                values, ids = logprobs.topk(batch.max_num_logprobs, dim=-1)
                out.top_ids, out.top_logprobs = ids.tolist(), values.tolist()
        return out
