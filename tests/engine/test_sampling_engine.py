"""Sampling through the whole engine (tiny fp32 model): penalties run (issue 9 item 1) and match
transformers' greedy with ``repetition_penalty``; seeded, penalised, biased and constrained requests come
out the same alone and in a batch pressured into chunking and preemption; sampling state is freed; a
failure in one request's sampling or post-processing fails that request alone; a failed forward fails its
step and the engine goes on (and gives up after repeated failures)."""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine import LLM, SamplingParams, faults
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import RequestFailedError
from kubeinfer.engine.llm_engine import MAX_CONSECUTIVE_FORWARD_FAILURES, EngineDeadError, LLMEngine
from transformers import AutoModelForCausalLM

from tests.engine.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.fixture(scope="module")
def llm(tiny_path: str) -> LLM:
    return LLM(tiny_path, dtype="float32", block_size=4, num_gpu_blocks_override=64, max_num_batched_tokens=64,
               max_model_len=256)


def run(engine: LLMEngine, jobs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, object]:
    for rid, (prompt, params) in jobs.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_all_freed(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks
    assert engine.sampler.num_sequences == 0


@pytest.mark.parametrize("params", [
    SamplingParams(repetition_penalty=1.1, max_tokens=6),
    SamplingParams(presence_penalty=0.5, max_tokens=6),
    SamplingParams(frequency_penalty=-0.5, max_tokens=6, n=2, seed=3),
])
def test_penalised_requests_generate_offline(llm: LLM, params: SamplingParams) -> None:
    """The issue's reproducer: this raised "Inplace update to inference tensor outside InferenceMode"."""
    [out] = llm.generate(["Hello"], params)
    assert all(len(c.token_ids) >= 1 for c in out.outputs) and len(out.outputs) == params.n
    assert_all_freed(llm.llm_engine)


def test_repetition_penalty_matches_transformers(llm: LLM, tiny_path: str) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    prompt = [72, 101, 108, 108, 111, 72, 101]
    for penalty in (1.3, 0.7):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                               repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        [out] = llm.generate([prompt], SamplingParams(temperature=0, repetition_penalty=penalty, max_tokens=16,
                                                      ignore_eos=True))
        assert out.outputs[0].token_ids == expected.tolist()
    [plain] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert plain.outputs[0].token_ids != out.outputs[0].token_ids  # the penalty did something


def stateful_jobs(vocab: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """Requests whose sampling keeps per-sequence state, each with its own prompt."""
    kinds = [
        SamplingParams(temperature=1.0, seed=11, repetition_penalty=1.4, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=12, presence_penalty=1.0, frequency_penalty=0.5,
                       max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=13, logit_bias={65: 5.0, 66: -100.0}, max_tokens=18, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=14, allowed_token_ids=[97, 98, 99, 100, 258], max_tokens=16),
        SamplingParams(temperature=1.0, seed=15, n=3, frequency_penalty=1.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=22, ignore_eos=True),
    ]
    jobs = {}
    for i in range(12):
        prompt = [(7 * i + 3 * k) % 250 + 1 for k in range(5 + 4 * (i % 4))]
        jobs[f"r{i}"] = (prompt, kinds[i % len(kinds)])
    return jobs


def test_stateful_sampling_survives_preemption_and_chunking(llm: LLM, tiny_path: str) -> None:
    jobs = stateful_jobs(320)
    alone = {rid: run(llm.llm_engine, {rid: job})[rid] for rid, job in jobs.items()}
    # 4-token blocks, 28 of them and an 8-token step budget: chunked prefills and preemptions.
    pressured = LLMEngine(EngineConfig(model=tiny_path, dtype="float32", block_size=4, num_gpu_blocks_override=28,
                                       max_num_batched_tokens=8, max_model_len=256))
    together = run(pressured, jobs)
    stats = pressured.get_stats()
    assert stats.num_preemptions_total > 0 and stats.num_prefill_chunks_total > 0
    for rid in jobs:
        got = [c.token_ids for c in together[rid].outputs]  # type: ignore[attr-defined]
        want = [c.token_ids for c in alone[rid].outputs]  # type: ignore[attr-defined]
        assert got == want, rid
    biased = together["r2"].outputs[0].token_ids  # type: ignore[attr-defined]
    assert 66 not in biased
    allowed = together["r3"].outputs[0].token_ids  # type: ignore[attr-defined]
    assert set(allowed) <= {97, 98, 99, 100, 258}
    assert_all_freed(pressured)
    assert_all_freed(llm.llm_engine)


def test_abort_frees_sampling_state(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("a", [5, 6, 7], SamplingParams(seed=1, repetition_penalty=1.2, n=2, max_tokens=50,
                                                      ignore_eos=True))
    engine.add_request("b", [5, 6, 7], SamplingParams(allowed_token_ids=[1, 2], max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.sampler.num_sequences == 3
    engine.abort_request(["a", "b"])
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_freed(engine)


@pytest.mark.parametrize("point", ["sample", "postprocess"])
def test_a_failing_request_fails_alone(llm: LLM, point: str, monkeypatch, caplog) -> None:
    monkeypatch.setattr(faults, "_POINTS", {point: 666})
    engine = llm.llm_engine
    jobs = {"good": ([1, 2, 3], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
            "bad": ([1, 2, 4], SamplingParams(temperature=1.0, seed=666, max_tokens=8, ignore_eos=True, n=2)),
            "good-pen": ([1, 2, 5], SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.2, max_tokens=8,
                                                   ignore_eos=True))}
    with caplog.at_level("ERROR", logger="kubeinfer.engine.llm_engine"):
        done = run(engine, jobs)
    assert done["bad"].error is not None and "injected" in done["bad"].error  # type: ignore[attr-defined]
    assert all(c.finish_reason == "error" for c in done["bad"].outputs)  # type: ignore[attr-defined]
    for rid in ("good", "good-pen"):
        assert done[rid].error is None and len(done[rid].outputs[0].token_ids) == 8  # type: ignore[attr-defined]
    assert any("bad" in r.getMessage() and r.exc_info for r in caplog.records)
    assert_all_freed(engine)
    with pytest.raises(RequestFailedError, match="injected"):
        llm.generate(["x"], SamplingParams(seed=666))
    assert_all_freed(engine)


def test_a_failed_forward_fails_its_step_and_the_engine_goes_on(llm: LLM, monkeypatch) -> None:
    monkeypatch.setattr(faults, "_POINTS", {"forward": 777})
    engine = llm.llm_engine
    done = run(engine, {"innocent": ([1, 2], SamplingParams(max_tokens=4, ignore_eos=True)),
                        "poison": ([3, 4], SamplingParams(seed=777, max_tokens=4))})
    assert "forward failed" in (done["poison"].error or "")  # type: ignore[attr-defined]
    assert "forward failed" in (done["innocent"].error or "")  # type: ignore[attr-defined] # same step
    assert_all_freed(engine)
    after = run(engine, {"later": ([1, 2], SamplingParams(max_tokens=4, ignore_eos=True))})
    assert after["later"].error is None and len(after["later"].outputs[0].token_ids) == 4  # type: ignore[attr-defined]
    # A forward that keeps failing: the engine gives up rather than looping on errors.
    for i in range(MAX_CONSECUTIVE_FORWARD_FAILURES - 1):
        engine.add_request(f"p{i}", [3, 4], SamplingParams(seed=777))
        engine.step()
    engine.add_request("last", [3, 4], SamplingParams(seed=777))
    with pytest.raises(EngineDeadError):
        engine.step()
    assert [o.request_id for o in engine.step()] == ["last"]
    assert_all_freed(engine)
    engine._consecutive_forward_failures = 0
