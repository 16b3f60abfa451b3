"""Prompt logprobs (vLLM's ``SamplingParams.prompt_logprobs``), scored in the prefill's own forward.

The logits at prompt position ``p`` score prompt token ``p + 1``; token 0 has no logprob (``None``,
as in vLLM and OpenAI's ``echo``). Each prefill chunk scores the tokens its positions predict, so
chunked prefill needs nothing special. A prefix-cache hit would skip the forward of the cached
positions, so the scheduler takes no hit for a request whose prompt logprobs are still incomplete
(its own blocks are published to the cache as usual). A sequence recomputed after preemption does
not score its prompt again: positions already recorded are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kubeinfer.engine.outputs import Logprob

if TYPE_CHECKING:
    from kubeinfer.engine.core.scheduler import ScheduledSeq
    from kubeinfer.engine.sequence import Request

# Rows of logits materialised at a time (each row is vocab_size float32s).
_SCORE_CHUNK_ROWS = 256


@dataclass
class PromptLogprobRows:
    """What the model runner scores this step: flat token rows and the prompt token each one predicts."""

    rows: np.ndarray  # int64 [R], indices into the step's flat batch
    targets: np.ndarray  # int64 [R]
    k: int  # top-k alternatives to return (the largest asked for in the batch)
    spans: list[tuple[Request, int]]  # (request, how many of the rows) in row order


@dataclass
class PromptScores:
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


def plan_prompt_logprobs(scheduled: list[ScheduledSeq]) -> PromptLogprobRows | None:
    """The rows of this step's flat batch whose logits score a prompt token not yet recorded."""
    rows: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    spans: list[tuple[Request, int]] = []
    k = 0
    offset = 0
    for item in scheduled:
        request = item.seq.request
        recorded = request.prompt_logprobs
        if recorded is not None and item.seq.index == 0:
            # Positions p in this chunk with p + 1 a prompt token that has no logprob yet.
            first = max(item.start, len(recorded) - 1)
            last = min(item.start + item.num_new_tokens, request.num_prompt_tokens - 1)
            if last > first:
                positions = np.arange(first, last, dtype=np.int64)
                rows.append(offset + positions - item.start)
                targets.append(np.asarray(request.prompt_token_ids[first + 1 : last + 1], dtype=np.int64))
                spans.append((request, last - first))
                k = max(k, request.params.prompt_logprobs or 0)
        offset += item.num_new_tokens
    if not spans:
        return None
    return PromptLogprobRows(np.concatenate(rows), np.concatenate(targets), k, spans)


@torch.inference_mode()
def score_prompt_rows(model: Any, hidden: torch.Tensor, plan: PromptLogprobRows) -> PromptScores:
    """Log-softmax of the model's logits at ``plan.rows`` (float32), chunked to bound memory; runs on
    every tensor-parallel rank (the LM head gathers across them)."""
    device = hidden.device
    rows = torch.as_tensor(plan.rows, device=device)
    targets = torch.as_tensor(plan.targets, device=device)
    values, ranks, top_ids, top_values = [], [], [], []
    for begin in range(0, rows.numel(), _SCORE_CHUNK_ROWS):
        chunk = rows[begin : begin + _SCORE_CHUNK_ROWS]
        logprobs = model.compute_logits(hidden.index_select(0, chunk)).float().log_softmax(dim=-1)
        target = logprobs.gather(1, targets[begin : begin + chunk.numel()].unsqueeze(1))
        values.append(target.squeeze(1))
        ranks.append((logprobs > target).sum(dim=-1) + 1)
        if plan.k > 0:
            top = logprobs.topk(plan.k, dim=-1)
            top_values.append(top.values)
            top_ids.append(top.indices)
    return PromptScores(
        logprobs=torch.cat(values).tolist(),
        ranks=torch.cat(ranks).tolist(),
        top_ids=torch.cat(top_ids).tolist() if top_ids else None,
        top_logprobs=torch.cat(top_values).tolist() if top_values else None,
    )


def record_prompt_logprobs(plan: PromptLogprobRows, scores: PromptScores, decode: Any) -> None:
    """Append each scored token's ``{token_id: Logprob}`` (itself first, then its top-k) to its request."""
    row = 0
    for request, count in plan.spans:
        recorded = request.prompt_logprobs
        assert recorded is not None
        k = request.params.prompt_logprobs or 0
        for i in range(row, row + count):
            token_id = int(plan.targets[i])
            entry = {token_id: Logprob(scores.logprobs[i], scores.ranks[i], decode(token_id))}
            if k and scores.top_ids is not None and scores.top_logprobs is not None:
                for rank, (tid, value) in enumerate(
                    zip(scores.top_ids[i][:k], scores.top_logprobs[i][:k], strict=True), start=1
                ):
                    if tid not in entry:
                        entry[tid] = Logprob(value, rank, decode(tid))
            recorded.append(entry)
        row += count
