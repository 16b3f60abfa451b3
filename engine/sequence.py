"""One request's state: its sequences (``n`` of them), their tokens, blocks and progress.

A request starts with a single sequence that prefills the prompt. When that prefill is done
and ``n > 1``, the sequence forks: the children share every prompt block (reference counts),
and the shared last partial block is copied on first write (see ``BlockManager``).
Sampling state (generators, penalty counts, constraints) is not here: the sampler owns it, keyed by
``seq_id`` (``engine/sample/``).
"""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto
from typing import Any

from kubeinfer.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kubeinfer.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request: Request, token_ids: list[int], index: int = 0) -> None:
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_prompt_tokens = request.num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of the full blocks of token_ids
        self.num_registered_blocks = 0  # head of block_table already published to the prefix cache
        self.status = SequenceStatus.WAITING
        # Output side.
        self.output_text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.detokenizer: Any = None  # IncrementalDetokenizer, set by the engine
        self.runner_state: Any = None  # model-runner-owned cache of the block table

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, tokens={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.name})")

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def fork(self, index: int) -> Sequence:
        """A sibling with the same tokens and progress; the caller shares the blocks."""
        child = Sequence(self.request, list(self.token_ids), index)
        child.num_computed_tokens = self.num_computed_tokens
        child.block_hashes = list(self.block_hashes)
        child.status = self.status
        return child

    def completion_output(self, finished_text: bool) -> CompletionOutput:
        text = self.output_text
        if not finished_text:  # hold back what could still become a stop string
            hold = self.params.max_stop_str_len - 1
            if hold > 0:
                text = text[: max(0, len(text) - hold)]
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=self.output_token_ids,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        self.num_cached_tokens = 0
        self.forked = params.n == 1
        self.seqs: list[Sequence] = [Sequence(self, list(prompt_token_ids), 0)]
        self.aborted = False
        # Filled by prompt_logprobs.py as the prefill goes; the first prompt token has none.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether some prompt token still has to be scored (then no prefix-cache hit may skip it)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.aborted or (self.forked and all(s.is_finished for s in self.seqs))

    def make_output(self) -> RequestOutput:
        finished = self.is_finished
        seqs = sorted(self.seqs, key=lambda s: s.index)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion_output(finished_text=s.is_finished) for s in seqs],
            finished=finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
        )
