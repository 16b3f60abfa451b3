"""Continuous batching with one token budget per step.

Each step the running sequences go first, in arrival order: a decoding sequence takes one token
of ``max_num_batched_tokens``, a sequence still prefilling takes as much of its prompt as the
budget leaves (chunked prefill). Then waiting sequences are admitted, first come first served,
while budget, ``max_num_seqs`` and KV blocks last. When a running sequence needs a block and
none is free, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed later (prefix caching usually makes that cheap). No
sequence is ever dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from kubeinfer.engine.core.block_manager import BlockManager
from kubeinfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last known token, so it samples the next one."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self.num_prefill_chunks_total = 0  # prefill steps that stopped short of the prompt's end

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate_slots(seq, num_new):
                victim = self.running.pop()  # the newest; never one already scheduled this step
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            self._take(out, seq, num_new)
            budget -= num_new
            i += 1

        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            seats = 1 if seq.request.forked else seq.request.params.n  # an unforked n>1 request grows
            if len(self.running) + seats > self.max_num_seqs:
                break
            # Prompt logprobs need the forward of every prompt position: no hit may skip one.
            computed = [] if seq.request.needs_prompt_logprobs else bm.get_computed_blocks(seq)
            num_cached = len(computed) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate_slots(seq, num_new, computed):
                break
            bm.record_prefix_lookup(seq.num_tokens, num_cached)
            if seq.index == 0 and seq.request.metrics.first_scheduled_time is None:
                seq.request.num_cached_tokens = num_cached
            seq.num_computed_tokens = num_cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._take(out, seq, num_new)
            budget -= num_new

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        out.block_copies = bm.take_pending_copies()
        return out

    def _take(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        scheduled = ScheduledSeq(seq, seq.num_computed_tokens, num_new)
        out.scheduled.append(scheduled)
        seq.num_computed_tokens += num_new
        if seq.num_computed_tokens < seq.num_tokens:
            self.num_prefill_chunks_total += 1

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)  # also resets num_computed_tokens: recompute from scratch
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1

    def add_forked(self, parent: Sequence, child: Sequence) -> None:
        """Place an ``n > 1`` child right after its parent in the running list."""
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence) -> None:
        """Retire a running sequence that stopped; its blocks go back (cached ones stay cached)."""
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            if seq.status == SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
                self.waiting.remove(seq)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
