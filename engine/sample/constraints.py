"""The allowed-token mask hook: per-sequence constraints on the next token, applied batched.

A ``TokenConstraint`` belongs to one sequence and is owned by the sampler (created by
``make_constraints`` when the sequence is added, forked for ``n > 1``, dropped when the sequence is
freed). Each step, for every row that samples, the sampler asks each of the row's constraints to write
the tokens it allows into that row of one shared bitmask, then masks the whole batch's logits in one go
and, once the token is drawn, tells each constraint which token it got (``accept_token``).

The bitmask is xgrammar's (and vLLM's) layout: int32 ``[rows, ceil(vocab / 32)]`` on the CPU, bit ``t % 32``
of word ``t // 32`` set = token ``t`` allowed; it starts all ones (everything allowed). A grammar matcher
fits as is: ``fill_bitmask(bitmask, row)`` is ``matcher.fill_next_token_bitmask(bitmask, row)``, and the
masking itself (``apply_bitmask``) may be swapped for ``xgrammar.apply_token_bitmask_inplace``.

To add a kind of constraint (structured outputs): implement ``TokenConstraint`` and return it from
``make_constraints`` for the requests that ask for it. The constraint's state must depend only on the
tokens it accepted: a sequence preempted by recompute keeps its tokens and so its constraints as they are.
"""

from __future__ import annotations

from typing import Protocol

import torch
from kubeinfer.engine.sampling_params import SamplingParams


class TokenConstraint(Protocol):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (overwrite the row; the sampler ANDs several)."""

    def accept_token(self, token_id: int) -> None:
        """The token this sequence just sampled (raise to fail this request alone)."""

    def fork(self) -> TokenConstraint:
        """An independent copy for a sibling sequence of an ``n > 1`` request (forked before its first token)."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((num_rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """bool ``[..., vocab]`` -> packed int32 ``[..., words]``."""
    vocab = allowed.shape[-1]
    padded = torch.zeros((*allowed.shape[:-1], bitmask_words(vocab) * 32), dtype=torch.int64)
    padded[..., :vocab] = allowed.to(torch.int64).cpu()
    words = (padded.view(*allowed.shape[:-1], -1, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 ``[rows, words]`` -> bool ``[rows, vocab]``."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of ``rows`` whose bit in the matching ``bitmask`` row is clear
    (xgrammar's kernel: 10-100x faster than unpacking the bits with torch on the CPU)."""
    import xgrammar as xgr

    bitmask = bitmask.to(logits.device, non_blocking=True)
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])
        return
    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32, device=bitmask.device)
    full[torch.tensor(rows, dtype=torch.long, device=bitmask.device)] = bitmask
    xgr.apply_token_bitmask_inplace(logits, full, vocab_size=logits.shape[1], indices=rows)


class AllowedTokenIds:
    """vLLM's ``allowed_token_ids``: a fixed set of tokens, the same every step."""

    def __init__(self, token_ids: list[int], vocab_size: int) -> None:
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[torch.tensor(token_ids, dtype=torch.long)] = True
        self._row = pack_bitmask(allowed)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = self._row

    def accept_token(self, token_id: int) -> None:
        pass

    def fork(self) -> AllowedTokenIds:
        return self  # stateless: siblings share it


def make_constraints(params: SamplingParams, vocab_size: int) -> list[TokenConstraint]:
    """The constraints one sequence of a request with ``params`` samples under (most requests: none)."""
    from kubeinfer.engine.sample.grammar import GrammarConstraint

    constraints: list[TokenConstraint] = []
    if params.compiled_grammar is not None:  # structured outputs (compiled by the engine in add_request)
        constraints.append(GrammarConstraint(params.compiled_grammar))
    if params.allowed_token_ids:
        constraints.append(AllowedTokenIds(params.allowed_token_ids, vocab_size))
    return constraints
