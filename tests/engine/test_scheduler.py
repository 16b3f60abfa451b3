"""Scheduler: one token budget, chunked prefill, max_num_seqs, FCFS, preemption by recompute, abort."""

from __future__ import annotations

from kubeinfer.engine.core.block_manager import BlockManager
from kubeinfer.engine.core.scheduler import Scheduler, SchedulerOutput
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.sequence import Request, Sequence, SequenceStatus

BS = 4


def make_seq(rid: str, num_prompt: int, max_tokens: int = 4) -> Sequence:
    tokens = [hash((rid, i)) % 1000 for i in range(num_prompt)]
    return Request(rid, None, tokens, SamplingParams(max_tokens=max_tokens)).seqs[0]


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget)


def fake_model_step(sched: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """What the engine does after the forward pass: sampling sequences get a token; some finish."""
    finished = []
    for item in out.scheduled:
        if item.samples:
            seq = item.seq
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq)
                finished.append(seq)
    return finished


def run_to_completion(sched: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        outs.append(out)
        fake_model_step(sched, out)
    raise AssertionError("scheduler did not finish: a request was starved")


def assert_no_blocks_held(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_long_prompt_is_prefilled_in_chunks() -> None:
    sched = make_scheduler(budget=16)
    seq = make_seq("long", 40)
    sched.add(seq)
    sizes = []
    for _ in range(3):
        out = sched.schedule()
        assert [i.seq for i in out.scheduled] == [seq]
        sizes.append(out.scheduled[0].num_new_tokens)
        assert out.scheduled[0].samples == (sum(sizes) == 40)
        fake_model_step(sched, out)
    assert sizes == [16, 16, 8]
    assert sched.num_prefill_chunks_total == 2
    out = sched.schedule()  # now decoding, one token
    assert out.scheduled[0].num_new_tokens == 1 and out.scheduled[0].start == 40


def test_decodes_and_prefill_share_one_budget() -> None:
    sched = make_scheduler(budget=10)
    a, b = make_seq("a", 5), make_seq("b", 30)
    sched.add(a)
    fake_model_step(sched, sched.schedule())  # a prefilled, has 1 output token
    sched.add(b)
    out = sched.schedule()
    assert [(i.seq.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.num_batched_tokens == 10


def test_max_num_seqs_and_fcfs() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=100)
    seqs = [make_seq(f"r{i}", 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    run_to_completion(sched)
    assert_no_blocks_held(sched)


def test_preempts_newest_when_blocks_run_out_and_never_drops() -> None:
    # 6 blocks of 4 tokens; three sequences of 8 prompt tokens (2 blocks each) fill the cache,
    # and their first decoded tokens need a third block each.
    sched = make_scheduler(num_blocks=6, max_num_seqs=8, budget=64)
    seqs = [make_seq(f"r{i}", 8, max_tokens=6) for i in range(3)]
    for s in seqs:
        sched.add(s)
    fake_model_step(sched, sched.schedule())
    assert sched.block_manager.num_free_blocks == 0
    out = sched.schedule()
    assert out.preempted == [seqs[2]]  # the newest goes back to the front of the queue
    assert seqs[2].status == SequenceStatus.WAITING and seqs[2].block_table == []
    assert seqs[2].num_computed_tokens == 0 and seqs[2].num_output_tokens == 1  # keeps its tokens
    assert sched.waiting[0] is seqs[2]
    assert [i.seq for i in out.scheduled] == seqs[:2]
    fake_model_step(sched, out)
    outs = run_to_completion(sched)
    assert sched.num_preemptions_total >= 1
    assert all(s.num_output_tokens == 6 for s in seqs)
    # recomputation covered the preempted sequence's prompt and its earlier output
    recompute = [i for o in outs for i in o.scheduled if i.seq is seqs[2] and i.start == 0]
    assert recompute and recompute[0].num_new_tokens >= 9
    assert_no_blocks_held(sched)


def test_single_sequence_preempts_itself_then_resumes() -> None:
    sched = make_scheduler(num_blocks=3, max_num_seqs=4, budget=64)
    a, b = make_seq("a", 4, max_tokens=8), make_seq("b", 4, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_to_completion(sched)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert sched.num_preemptions_total >= 1
    assert_no_blocks_held(sched)


def test_abort_frees_everything_at_once() -> None:
    sched = make_scheduler(budget=8)
    running, waiting = make_seq("run", 20), make_seq("wait", 5)
    sched.add(running)
    sched.add(waiting)
    fake_model_step(sched, sched.schedule())  # "run" is mid-prefill, "wait" still waits
    assert running.block_table and waiting.status == SequenceStatus.WAITING
    sched.abort([running, waiting])
    assert not sched.has_unfinished()
    assert_no_blocks_held(sched)


def test_prefix_cache_hits_are_counted_and_skip_compute() -> None:
    sched = make_scheduler(budget=64)
    first = make_seq("a", 13)
    sched.add(first)
    run_to_completion(sched)
    again = Request("b", None, list(first.token_ids[:13]), SamplingParams(max_tokens=2)).seqs[0]
    sched.add(again)
    out = sched.schedule()
    assert out.scheduled[0].start == 12 and out.scheduled[0].num_new_tokens == 1
    bm = sched.block_manager
    assert bm.prefix_cache_hits == 12 and bm.prefix_cache_queries == 26
    run_to_completion(sched)
    assert_no_blocks_held(sched)
