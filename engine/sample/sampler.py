"""The sampler: owner of every sequence's sampling state, and logits -> next tokens (+ logprobs).

The engine registers a sequence (``add_sequence`` / ``fork_sequence``), describes each step's rows with
``SampleRow``s, calls ``prepare`` before the forward and ``sample`` after it, and ``free_sequence`` when
the sequence finishes or is aborted. Everything that creates or updates state runs here, under
``torch.inference_mode``.

Per row, in vLLM's order: allowed-token constraints (a structured-output grammar's mask is filled by a
worker thread between ``prepare`` and ``sample``, that is while the forward runs; ``grammar.py``), ``logit_bias``, ``min_tokens`` (stop ids masked),
penalties; then greedy rows take the argmax and random rows are scaled by temperature, filtered by
top-k, top-p and min-p and drawn with the exponential race, from the request's own generator when it
has a seed. Logprobs are the model's raw log-softmax (vLLM's default ``raw_logprobs``). When every
row is plain greedy the whole sampler is one ``argmax``.

A failure confined to one row (its constraint raising, its state missing, or anything in the batched
pass that the row alone reproduces) fails that row only: it is reported in ``SamplerOutput.failed``
and the other rows sample normally.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from kubeinfer.engine import faults
from kubeinfer.engine.sample.constraints import allocate_bitmask, apply_bitmask, make_constraints
from kubeinfer.engine.sample.filters import apply_min_p, apply_top_k_top_p, exponential_race, greedy_ids
from kubeinfer.engine.sample.grammar import GrammarConstraint, fill_bitmasks
from kubeinfer.engine.sample.logit_bias import apply_logit_bias, bias_tensors
from kubeinfer.engine.sample.penalties import apply_penalties
from kubeinfer.engine.sample.state import SequenceSamplingState, make_generator
from kubeinfer.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_NEUTRAL = SamplingParams(temperature=0.0)  # stands in for a row whose preparation failed


@dataclass(frozen=True, slots=True)
class SampleRow:
    """What the sampler needs to know about one row beyond its own state."""

    seq_id: int
    params: SamplingParams
    num_output_tokens: int  # before this step's token (for min_tokens)


@dataclass
class SamplingBatch:
    """One step's rows as tensors, built by ``Sampler.prepare``."""

    rows: list[SampleRow]
    states: list[SequenceSamplingState | None]  # None: the row failed in prepare
    params: list[SamplingParams]
    greedy: torch.Tensor | None = None  # [S] bool, None when every row is greedy
    temperatures: torch.Tensor | None = None  # [S] float32 (1.0 on greedy rows)
    top_k: torch.Tensor | None = None  # [S] int64, vocab size = off
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    generators: list[torch.Generator | None] | None = None
    prompt_mask: torch.Tensor | None = None  # [S, vocab]
    output_counts: torch.Tensor | None = None  # [S, vocab]
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    mask_rows: list[int] = field(default_factory=list)  # rows with constraints, and their bitmask rows
    bitmask: torch.Tensor | None = None
    pending_masks: Future[None] | None = None  # grammar rows of ``bitmask`` still being filled
    bias_rows: list[int] = field(default_factory=list)
    biases: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    suppress: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, ids) masked by min_tokens
    max_num_logprobs: int | None = None
    failed: dict[int, BaseException] = field(default_factory=dict)

    @property
    def all_greedy(self) -> bool:
        return self.greedy is None

    @property
    def processes_in_place(self) -> bool:
        return self.bitmask is not None or bool(self.biases) or bool(self.suppress)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # With logprobs requested: top ids/values [S, k], and the sampled token's logprob and rank [S].
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    sampled_logprobs: list[float] | None = None
    sampled_ranks: list[int] | None = None
    failed: dict[int, BaseException] = field(default_factory=dict)  # row -> why (its token is meaningless)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._states: dict[int, SequenceSamplingState] = {}
        self._mask_worker: ThreadPoolExecutor | None = None  # fills grammar masks while the forward runs
        self.timings: dict[str, float] = defaultdict(float)  # seconds: grammar_wait, mask_apply

    # ---- per-sequence state ---------------------------------------------------------------
    @torch.inference_mode()
    def add_sequence(self, seq_id: int, params: SamplingParams, prompt_token_ids: list[int], index: int = 0) -> None:
        bias = bias_tensors(params.logit_bias, self.device) if params.logit_bias else None
        self._states[seq_id] = SequenceSamplingState(
            params, prompt_token_ids, generator=make_generator(params, index, self.device),
            constraints=make_constraints(params, self.vocab_size), logit_bias=bias)

    @torch.inference_mode()
    def fork_sequence(self, parent_id: int, child_id: int, index: int) -> None:
        self._states[child_id] = self._states[parent_id].fork(index, self.device)

    def free_sequence(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    @property
    def num_sequences(self) -> int:
        return len(self._states)

    def constraints_complete(self, seq_id: int) -> bool:
        """Whether one of the sequence's constraints is complete (a grammar that accepted its stop token)."""
        state = self._states.get(seq_id)
        return state is not None and any(getattr(c, "is_terminated", False) for c in state.constraints)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._states

    # ---- one step -------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, rows: list[SampleRow]) -> SamplingBatch:
        """The step's sampling batch (before the forward: nothing here needs the logits)."""
        batch = SamplingBatch(rows, [], [])
        for i, row in enumerate(rows):
            state = self._states.get(row.seq_id)
            if state is None:
                batch.failed[i] = KeyError(f"no sampling state for sequence {row.seq_id}")
            batch.states.append(state)
            batch.params.append(row.params if state is not None else _NEUTRAL)
        self._add_masks(batch)
        self._add_settings(batch)
        return batch

    def _add_masks(self, batch: SamplingBatch) -> None:
        constrained = [i for i, st in enumerate(batch.states) if st is not None and st.constraints]
        if constrained:
            bitmask = allocate_bitmask(len(constrained), self.vocab_size)
            scratch = None
            grammars: list[tuple[int, GrammarConstraint]] = []  # filled by the mask worker during the forward
            for k, i in enumerate(constrained):
                state = batch.states[i]
                assert state is not None
                if len(state.constraints) == 1 and isinstance(state.constraints[0], GrammarConstraint):
                    if not state.constraints[0].is_terminated:  # a complete grammar's sequence is finishing
                        grammars.append((k, state.constraints[0]))
                    continue
                try:
                    for j, constraint in enumerate(state.constraints):
                        if j == 0:
                            constraint.fill_bitmask(bitmask, k)
                        else:  # several constraints: the row allows what all of them allow
                            scratch = allocate_bitmask(1, self.vocab_size) if scratch is None else scratch.fill_(-1)
                            constraint.fill_bitmask(scratch, 0)
                            bitmask[k] &= scratch[0]
                except Exception as exc:  # one request's constraint fails that request
                    batch.failed[i] = exc
                    bitmask[k] = -1
            batch.mask_rows, batch.bitmask = constrained, bitmask
            if grammars:
                if self._mask_worker is None:
                    self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
                batch.pending_masks = self._mask_worker.submit(
                    fill_bitmasks, [c for _, c in grammars], bitmask, [k for k, _ in grammars])
        for i, state in enumerate(batch.states):
            if state is not None and state.logit_bias is not None:
                batch.bias_rows.append(i)
                batch.biases.append(state.logit_bias)

    def _add_settings(self, batch: SamplingBatch) -> None:
        params, vocab = batch.params, self.vocab_size

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        if not all(p.temperature == 0.0 for p in params):
            batch.greedy = tensor([p.temperature == 0.0 for p in params], torch.bool)
            batch.temperatures = tensor([p.temperature or 1.0 for p in params], torch.float32)
            if any(p.top_k for p in params):
                batch.top_k = tensor([min(p.top_k, vocab) or vocab for p in params], torch.long)
            if any(p.top_p < 1.0 for p in params):
                batch.top_p = tensor([p.top_p for p in params], torch.float32)
            if any(p.min_p > 0.0 for p in params):
                batch.min_p = tensor([p.min_p for p in params], torch.float32)
            generators = [st.generator if st is not None else None for st in batch.states]
            if any(g is not None for g in generators):
                batch.generators = generators

        if any(p.has_penalties for p in params):
            masks, counts = [], []
            for state in batch.states:
                if state is None:
                    masks.append(torch.zeros(vocab, dtype=torch.bool, device=self.device))
                    counts.append(torch.zeros(vocab, dtype=torch.float32, device=self.device))
                else:
                    mask, count = state.penalty_tensors(vocab, self.device)
                    masks.append(mask)
                    counts.append(count)
            batch.prompt_mask, batch.output_counts = torch.stack(masks), torch.stack(counts)
            batch.presence = tensor([p.presence_penalty for p in params], torch.float32)
            batch.frequency = tensor([p.frequency_penalty for p in params], torch.float32)
            batch.repetition = tensor([p.repetition_penalty for p in params], torch.float32)

        batch.suppress = [(i, sorted(p.all_stop_token_ids)) for i, (p, row) in enumerate(zip(params, batch.rows,
                                                                                            strict=True))
                          if row.num_output_tokens < p.min_tokens and p.all_stop_token_ids]
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        batch.max_num_logprobs = max(num_logprobs) if num_logprobs else None

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Next tokens of ``batch``'s rows from their float logits ``[S, vocab]``; records them in the state."""
        try:
            out = self._sample(logits, batch)
        except Exception:  # find the row(s) at fault, sample the others
            logger.warning("batched sampling failed; retrying row by row", exc_info=True)
            out = self._sample_row_by_row(logits, batch)
        out.failed = {**batch.failed, **out.failed}
        self._record(batch, out)
        return out

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        for p in batch.params:
            faults.inject("sample", p.seed)
        raw = logits.float()
        logits = raw.clone() if batch.processes_in_place else raw
        if batch.pending_masks is not None:
            t0 = time.perf_counter()
            batch.pending_masks.result()  # the grammar masks, filled while the forward ran
            self.timings["grammar_wait"] += time.perf_counter() - t0
        if batch.bitmask is not None:
            t0 = time.perf_counter()
            apply_bitmask(logits, batch.bitmask, batch.mask_rows)
            self.timings["mask_apply"] += time.perf_counter() - t0
        if batch.biases:
            apply_logit_bias(logits, batch.bias_rows, batch.biases)
        for row, ids in batch.suppress:
            logits[row, ids] = float("-inf")
        if batch.output_counts is not None:
            assert batch.prompt_mask is not None and batch.repetition is not None
            assert batch.frequency is not None and batch.presence is not None
            logits = apply_penalties(logits, batch.prompt_mask, batch.output_counts, batch.repetition,
                                     batch.frequency, batch.presence)

        if batch.all_greedy:
            token_ids = greedy_ids(logits)
        else:
            assert batch.greedy is not None and batch.temperatures is not None
            greedy = greedy_ids(logits)
            scaled = logits / batch.temperatures.unsqueeze(1)
            if batch.top_k is not None or batch.top_p is not None:
                scaled = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
            probs = scaled.softmax(dim=-1)
            if batch.min_p is not None:
                probs = apply_min_p(probs, batch.min_p)
            random_ids = exponential_race(probs, batch.generators)
            token_ids = torch.where(batch.greedy, greedy, random_ids)

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

    def _sample_row_by_row(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        num_rows = len(batch.rows)
        out = SamplerOutput(token_ids=[0] * num_rows, top_ids=[[] for _ in range(num_rows)],
                            top_logprobs=[[] for _ in range(num_rows)], sampled_logprobs=[0.0] * num_rows,
                            sampled_ranks=[0] * num_rows)
        for i, row in enumerate(batch.rows):
            if i in batch.failed:
                continue
            try:
                one = self._sample(logits[i:i + 1], self.prepare([row]))
            except Exception as exc:
                out.failed[i] = exc
                continue
            out.token_ids[i] = one.token_ids[0]
            if one.sampled_logprobs is not None and one.sampled_ranks is not None:
                out.sampled_logprobs[i], out.sampled_ranks[i] = one.sampled_logprobs[0], one.sampled_ranks[0]  # type: ignore[index]
            if one.top_ids is not None and one.top_logprobs is not None:
                out.top_ids[i], out.top_logprobs[i] = one.top_ids[0], one.top_logprobs[0]  # type: ignore[index]
        return out

    def _record(self, batch: SamplingBatch, out: SamplerOutput) -> None:
        for i, (state, token_id) in enumerate(zip(batch.states, out.token_ids, strict=True)):
            if state is None or i in out.failed:
                continue
            try:
                state.record(token_id)
            except Exception as exc:  # e.g. a grammar that rejects the token
                out.failed[i] = exc
