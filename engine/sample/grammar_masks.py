"""The grammar side of a step: which rows are constrained, their masks filled while the forward runs.

``GrammarMasks`` owns every constrained sequence's ``GrammarConstraint`` (keyed by sequence id: added
when the request is added, forked for ``n > 1``, freed when the sequence finishes or is aborted). Each
step, ``start`` hands the constrained rows to a worker thread that fills one packed bitmask for all of
them (xgrammar's batch matcher; its C++ runs without the GIL), so the mask costs nothing on the critical
path when it takes less time than the forward; ``apply`` waits for it and masks the logits in place
(disallowed tokens -> -inf) before the sampler sees them, so logprobs are those of the masked
distribution, as in vLLM.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from kubeinfer.engine.sample.grammar import GrammarConstraint, fill_bitmasks

logger = logging.getLogger(__name__)


@dataclass
class PendingMasks:
    rows: list[int]  # rows of the step's logits that are constrained
    bitmask: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)], filled by ``future``
    future: Future[None]


class GrammarMasks:
    def __init__(self, vocab_size: int, max_threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.max_threads = max_threads
        self._constraints: dict[int, GrammarConstraint] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._bitmask: torch.Tensor | None = None  # reused between steps

    # ---- per-sequence state ---------------------------------------------------------------
    def add(self, seq_id: int, constraint: GrammarConstraint) -> None:
        self._constraints[seq_id] = constraint

    def fork(self, parent_id: int, child_id: int) -> None:
        parent = self._constraints.get(parent_id)
        if parent is not None:
            self._constraints[child_id] = parent.fork()

    def free(self, seq_id: int) -> None:
        self._constraints.pop(seq_id, None)

    def get(self, seq_id: int) -> GrammarConstraint | None:
        return self._constraints.get(seq_id)

    def accept(self, seq_id: int, token_id: int) -> bool:
        """Advance the sequence's matcher (raises ``GrammarRejectedToken`` if the token breaks the grammar);
        True once the grammar is complete (it accepted a stop token: nothing may follow)."""
        constraint = self._constraints.get(seq_id)
        if constraint is None:
            return False
        constraint.accept_token(token_id)
        return constraint.is_terminated

    def __len__(self) -> int:
        return len(self._constraints)

    # ---- one step -------------------------------------------------------------------------
    def start(self, seq_ids: list[int]) -> PendingMasks | None:
        """Begin filling the masks of the rows whose sequence is constrained (``seq_ids[row]``); None if none."""
        if not self._constraints:
            return None
        rows, constraints = [], []
        for row, seq_id in enumerate(seq_ids):
            constraint = self._constraints.get(seq_id)
            if constraint is not None and not constraint.is_terminated:
                rows.append(row)
                constraints.append(constraint)
        if not rows:
            return None
        bitmask = self._rows_of_bitmask(len(rows))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        future = self._executor.submit(fill_bitmasks, constraints, bitmask, list(range(len(rows))), self.max_threads)
        return PendingMasks(rows, bitmask, future)

    def _rows_of_bitmask(self, num_rows: int) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = torch.empty((max(num_rows, 8), words), dtype=torch.int32)
        return self._bitmask[:num_rows]

    @staticmethod
    def apply(pending: PendingMasks, logits: torch.Tensor) -> None:
        """Wait for the masks and set the disallowed logits of their rows to -inf, in place."""
        import xgrammar as xgr

        pending.future.result()
        bitmask = pending.bitmask if logits.device.type == "cpu" else pending.bitmask.to(logits.device,
                                                                                           non_blocking=True)
        if len(pending.rows) == logits.shape[0]:
            xgr.apply_token_bitmask_inplace(logits, bitmask)
        else:
            full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32, device=bitmask.device)
            full[pending.rows] = bitmask
            xgr.apply_token_bitmask_inplace(logits, full, indices=pending.rows)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
