"""LLMEngine: requests in, one scheduler step at a time, RequestOutputs out (vLLM's shape).

A step: scheduler -> model runner (logits) -> sampler (tokens; it owns every sequence's sampling state)
-> stop checks and detokenising -> outputs. Requests are validated once, here (``add_request``), with
typed errors (``engine/errors.py``). A failure while handling one request's tokens fails that request
alone (its output carries ``error``); a failed forward fails that step's requests, and after
``MAX_CONSECUTIVE_FORWARD_FAILURES`` in a row the engine gives up (``EngineDeadError``).

Not thread-safe: one owner thread (the async engine's loop, or ``LLM``) calls everything.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kubeinfer.engine import faults
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.core.block_manager import BlockManager
from kubeinfer.engine.core.scheduler import Scheduler, SchedulerOutput
from kubeinfer.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from kubeinfer.engine.errors import ContextLengthError, InvalidRequestError
from kubeinfer.engine.model_runner import ModelRunner
from kubeinfer.engine.outputs import Logprob, RequestOutput
from kubeinfer.engine.prompt_logprobs import plan_prompt_logprobs, record_prompt_logprobs
from kubeinfer.engine.sample import Sampler, SamplerOutput, SampleRow
from kubeinfer.engine.sample.grammar import GrammarCompiler
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.sequence import Request, Sequence

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FORWARD_FAILURES = 3


class EngineDeadError(RuntimeError):
    """The forward keeps failing: the engine cannot recover (the server reports failed, the pod restarts)."""


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_cache_usage: float  # 0..1, blocks held by live sequences
    num_gpu_blocks: int
    block_size: int
    num_preemptions_total: int
    prefix_cache_queries_total: int  # tokens
    prefix_cache_hits_total: int  # tokens
    prompt_tokens_total: int
    generation_tokens_total: int
    num_prefill_chunks_total: int = 0  # prefill steps that stopped before the prompt's end
    num_steps_total: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.tokenizer = self.runner.tokenizer
        self.served_model_name = config.served_model_name or self.runner.model_id
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(self.model_config.vocab_size, self.runner.device)
        self.grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                list(self.model_config.eos_token_ids))
        # Built on the first structured request (the server starts it in the background at start-up).
        self.requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []  # aborted requests, handed out by the next step()
        self._eos_token_ids = set(self.model_config.eos_token_ids)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_failed_forwards_total = 0
        self._consecutive_forward_failures = 0
        logger.info("engine ready: %s", self.runner.describe())

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises ``InvalidRequestError`` (message and param) for anything that could never run."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        params = dataclasses.replace(params) if params is not None else SamplingParams()  # re-validates
        prompt_text: str | None = None
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", "prompt")
            prompt_text, token_ids = prompt, self.tokenize(prompt)
        else:
            token_ids = list(prompt)
        self._validate(token_ids, params)
        num_prompt = len(token_ids)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - num_prompt
        params.all_stop_token_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            params.all_stop_token_ids |= self._eos_token_ids
        if params.structured_outputs is not None:  # InvalidGrammarError (a 400) when it does not compile
            params.compiled_grammar = self.grammar_compiler.compile(params.structured_outputs)

        request = Request(request_id, prompt_text, token_ids, params, arrival_time)
        seq = request.seqs[0]
        seq.detokenizer = self._detokenizer(request)
        self.sampler.add_sequence(seq.seq_id, params, request.prompt_token_ids)
        self.requests[request_id] = request
        self.prompt_tokens_total += num_prompt
        self.scheduler.add(seq)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """What only the loaded model can check: vocabulary, context length, the KV cache, batch size."""
        vocab = self.model_config.vocab_size
        if not token_ids:
            raise InvalidRequestError("the prompt is empty (it has no tokens)", "prompt")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}", "prompt")
        for param, ids in (("logit_bias", list(params.logit_bias or ())),
                           ("allowed_token_ids", params.allowed_token_ids or []),
                           ("stop_token_ids", params.stop_token_ids or [])):
            out_of_range = [t for t in ids if t >= vocab]
            if out_of_range:
                raise InvalidRequestError(f"{param} has token ids outside the vocabulary [0, {vocab}): "
                                          f"{out_of_range[:5]}", param, code="token_id_out_of_vocabulary")
        if params.n > self.config.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} is larger than max_num_seqs={self.config.max_num_seqs}", "n")
        num_prompt, limit = len(token_ids), self.max_model_len
        wanted = params.max_tokens if params.max_tokens is not None else max(1, params.min_tokens)
        if num_prompt + wanted > limit:
            asked = f"{num_prompt} in the prompt" + (f", {wanted} in the completion" if params.max_tokens else "")
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + (params.max_tokens or 0)} tokens ({asked}). Please reduce the length of the "
                "prompt or the completion.",
                "max_tokens" if params.max_tokens is not None and num_prompt < limit else "prompt")
        blocks = self.block_manager.blocks_needed(num_prompt + (params.max_tokens or limit - num_prompt))
        if blocks > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"the request needs up to {blocks} KV cache blocks ({num_prompt} prompt + "
                f"{params.max_tokens or limit - num_prompt} output tokens) but the cache holds only "
                f"{self.block_manager.num_blocks}; lower max_tokens or give the KV cache more memory", "max_tokens")

    def _detokenizer(self, request: Request) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now and free all their blocks; unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            request = self.requests.get(rid)
            if request is not None:
                self._pending_outputs.append(self._end_request(request, "abort"))

    def _end_request(self, request: Request, reason: str, error: str | None = None) -> RequestOutput:
        """Retire an unfinished request at once: blocks and sampling state freed, its final output made."""
        self.requests.pop(request.request_id, None)
        request.aborted = True
        self.scheduler.abort(request.seqs)
        for seq in request.seqs:
            self.sampler.free_sequence(seq.seq_id)
            if seq.finish_reason is None:
                seq.finish_reason = reason
        request.metrics.finished_time = time.time()
        output = request.make_output()
        output.error = error
        return output

    def _fail_request(self, request: Request, what: str, exc: BaseException) -> RequestOutput:
        logger.error("request %s failed while %s: %s: %s", request.request_id, what, type(exc).__name__, exc,
                     exc_info=exc)
        return self._end_request(request, "error", f"{what} failed: {type(exc).__name__}: {exc}"[:500])

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        now = time.time()
        sample_rows, sample_seqs = self._plan_sampling(sched, now)
        batch = self.sampler.prepare([SampleRow(s.seq_id, s.params, s.num_output_tokens) for s in sample_seqs]) \
            if sample_seqs else None
        t1 = time.perf_counter()
        prompt_rows = plan_prompt_logprobs(sched.scheduled)
        try:
            logits, prompt_scores = self.runner.execute(sched.scheduled, sched.block_copies, sample_rows,
                                                        prompt_rows)
        except Exception as exc:  # fail this step's requests, keep the engine
            outputs.extend(self._fail_step(sched, exc))
            return outputs
        self._consecutive_forward_failures = 0
        t2 = time.perf_counter()
        if prompt_rows is not None and prompt_scores is not None:
            record_prompt_logprobs(prompt_rows, prompt_scores, self._decode_token)
        if batch is not None and logits is not None:
            result = self.sampler.sample(logits, batch)
            t3 = time.perf_counter()
            outputs.extend(self._process_samples(sample_seqs, result))
        else:
            t3 = t2
        timings = self.runner.timings
        timings["schedule"] += t1 - t0
        timings["sample"] += t3 - t2
        timings["postprocess"] += time.perf_counter() - t3
        return outputs

    def _fail_step(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        self.num_failed_forwards_total += 1
        self._consecutive_forward_failures += 1
        requests = {item.seq.request.request_id: item.seq.request for item in sched.scheduled}
        logger.error("the model forward failed (%d in a row); failing the %d request(s) of this step: %s",
                     self._consecutive_forward_failures, len(requests), ", ".join(requests), exc_info=exc)
        outputs = [self._end_request(r, "error", f"the model forward failed: {type(exc).__name__}: {exc}"[:500])
                   for r in requests.values() if r.request_id in self.requests]
        if self._consecutive_forward_failures >= MAX_CONSECUTIVE_FORWARD_FAILURES:
            self._pending_outputs.extend(outputs)
            raise EngineDeadError(f"the model forward failed {self._consecutive_forward_failures} times in a row; "
                                  f"last: {type(exc).__name__}: {exc}") from exc
        return outputs

    def _plan_sampling(self, sched: SchedulerOutput, now: float) -> tuple[list[int], list[Sequence]]:
        """Which sequences sample this step; an ``n > 1`` request forks here, after its prefill."""
        rows: list[int] = []
        seqs: list[Sequence] = []
        for row, item in enumerate(sched.scheduled):
            request = item.seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            if not item.samples:
                continue
            rows.append(row)
            seqs.append(item.seq)
            if not request.forked:
                request.forked = True
                for index in range(1, request.params.n):
                    child = item.seq.fork(index)
                    child.detokenizer = self._detokenizer(request)
                    self.sampler.fork_sequence(item.seq.seq_id, child.seq_id, index)
                    self.scheduler.add_forked(item.seq, child)
                    request.seqs.append(child)
                    rows.append(row)
                    seqs.append(child)
        return rows, seqs

    def _process_samples(self, seqs: list[Sequence], result: SamplerOutput) -> list[RequestOutput]:
        """Append each row's token, then stop checks, detokenising and logprobs, one request at a time:
        a failure there (or in the sampler, for its row) fails that request alone."""
        now = time.time()
        touched: dict[str, Request] = {}
        failed: dict[str, tuple[Request, str, BaseException]] = {}
        for i, (seq, token_id) in enumerate(zip(seqs, result.token_ids, strict=True)):
            request = seq.request
            if request.request_id in failed:
                continue
            error = result.failed.get(i)
            if error is not None:
                failed[request.request_id] = (request, "sampling", error)
                continue
            try:
                self._accept_token(seq, i, token_id, result, now)
            except Exception as exc:
                failed[request.request_id] = (request, "processing the sampled token", exc)
                continue
            touched[request.request_id] = request
        outputs = [self._fail_request(request, what, exc) for request, what, exc in failed.values()]
        for request in touched.values():
            if request.request_id in failed:
                continue
            if request.is_finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
            outputs.append(request.make_output())
        return outputs

    def _accept_token(self, seq: Sequence, row: int, token_id: int, result: SamplerOutput, now: float) -> None:
        faults.inject("postprocess", seq.params.seed)
        seq.token_ids.append(token_id)
        self.generation_tokens_total += 1
        if seq.logprobs is not None:
            self._append_logprobs(seq, row, token_id, result)
        metrics = seq.request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        self._check_stop(seq, token_id)
        if seq.finish_reason is None and self.sampler.constraints_complete(seq.seq_id):
            seq.finish_reason = "stop"  # its grammar ended (ignore_eos or min_tokens kept it going): nothing may follow
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            self.sampler.free_sequence(seq.seq_id)

    def _append_logprobs(self, seq: Sequence, row: int, token_id: int, result: SamplerOutput) -> None:
        assert seq.logprobs is not None and result.sampled_logprobs is not None and result.sampled_ranks is not None
        decode = self._decode_token
        sampled = result.sampled_logprobs[row]
        seq.cumulative_logprob += sampled
        entry = {token_id: Logprob(sampled, result.sampled_ranks[row], decode(token_id))}
        k = seq.params.logprobs or 0
        if k and result.top_ids is not None and result.top_logprobs is not None:
            for rank, (tid, value) in enumerate(zip(result.top_ids[row][:k], result.top_logprobs[row][:k],
                                                    strict=True), start=1):
                if tid not in entry:
                    entry[tid] = Logprob(value, rank, decode(tid))
        seq.logprobs.append(entry)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        params = seq.params
        delta = seq.detokenizer.step(token_id)
        min_tokens_done = seq.num_output_tokens >= params.min_tokens
        if min_tokens_done and token_id in params.all_stop_token_ids:
            seq.finish_reason = "stop"
            seq.stop_reason = None if token_id in self._eos_token_ids and token_id not in params.stop_token_ids \
                else token_id
            if params.include_stop_str_in_output:
                seq.output_text += delta
            return
        seq.output_text += delta
        if min_tokens_done and params.stop and delta:
            hit = find_stop_string(seq.output_text, len(delta), params.stop, params.include_stop_str_in_output)
            if hit is not None:
                seq.stop_reason, cut = hit
                seq.output_text = seq.output_text[:cut]
                seq.finish_reason = "stop"
                return
        if seq.num_output_tokens >= (params.max_tokens or 0) or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    # ---- stats ----------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        return EngineStats(
            num_waiting=len(sch.waiting), num_running=len(sch.running), kv_cache_usage=bm.usage,
            num_gpu_blocks=bm.num_blocks, block_size=bm.block_size,
            num_preemptions_total=sch.num_preemptions_total,
            prefix_cache_queries_total=bm.prefix_cache_queries, prefix_cache_hits_total=bm.prefix_cache_hits,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            num_prefill_chunks_total=sch.num_prefill_chunks_total, num_steps_total=self.runner.num_steps)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine cannot step afterwards)."""
        self.runner.shutdown()

    def get_tokenizer(self) -> Any:
        return self.tokenizer
