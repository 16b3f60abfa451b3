"""The offline API and the engine's request handling on a tiny model: n > 1 with copy-on-write,
seeds, stop strings, logprobs, abort, bad input (the engine keeps serving), block accounting."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import pytest
import torch
from kubeinfer.engine import LLM, SamplingParams
from kubeinfer.engine.errors import ContextLengthError, InvalidRequestError
from kubeinfer.engine.llm_engine import LLMEngine

from tests.engine.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return LLM(str(path), dtype="float32", block_size=4, num_gpu_blocks_override=48, max_num_batched_tokens=64,
               max_model_len=256)


def assert_blocks_released(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert engine.sampler.num_sequences == 0  # every sequence's sampling state was freed


def test_generate_accepts_strings_token_ids_and_keeps_order(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(["hello", [72, 105], "a much longer prompt than the others"], greedy)
    assert [o.prompt for o in outs] == ["hello", None, "a much longer prompt than the others"]
    assert outs[1].prompt_token_ids == [72, 105]
    assert all(len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length" for o in outs)
    alone = llm.generate("hello", greedy)[0]
    assert alone.outputs[0].token_ids == outs[0].outputs[0].token_ids
    per_prompt = llm.generate(["x", "y"], [SamplingParams(max_tokens=2, ignore_eos=True),
                                          SamplingParams(max_tokens=7, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in per_prompt] == [2, 7]
    assert_blocks_released(llm.llm_engine)


def test_chat_applies_template(llm: LLM) -> None:
    outs = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3))
    assert outs[0].prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    two = llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                   SamplingParams(max_tokens=2))
    assert len(two) == 2


def test_seeded_sampling_reproduces(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    first = llm.generate("seed test", params)[0].outputs[0].token_ids
    # Batched with other (unseeded) requests: the seeded one is unchanged.
    mixed = llm.generate(["noise one", "seed test", "noise two"],
                         [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True), params,
                          SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)])
    assert mixed[1].outputs[0].token_ids == first
    other = llm.generate("seed test", SamplingParams(temperature=1.0, top_p=0.9, seed=124, max_tokens=12,
                                                     ignore_eos=True))[0]
    assert other.outputs[0].token_ids != first


def test_n_greater_than_one_shares_prompt_blocks_with_copy_on_write(llm: LLM) -> None:
    engine = llm.llm_engine
    prompt = list(range(60, 70))  # 10 tokens: 2 full blocks + a shared partial block of 2 tokens
    n = 4
    params = SamplingParams(temperature=1.0, seed=5, n=n, max_tokens=10, ignore_eos=True)
    engine.add_request("fork", prompt, params)
    engine.step()  # prefill once, fork, first tokens
    request = engine.requests["fork"]
    assert len(request.seqs) == n
    shared = request.seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in request.seqs)
    assert all(engine.block_manager.blocks[b].ref_count == n for b in shared)
    assert engine.get_stats().prompt_tokens_total > 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = out
    assert_blocks_released(engine)
    assert [c.index for c in result.outputs] == list(range(n))
    # Child i samples with seed + i: exactly what a lone n=1 request with that seed produces. This
    # only holds if the copy-on-write copied the shared partial block's K/V correctly.
    for i, completion in enumerate(result.outputs):
        lone = llm.generate(prompt, SamplingParams(temperature=1.0, seed=5 + i, max_tokens=10, ignore_eos=True))
        assert completion.token_ids == lone[0].outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in result.outputs}) > 1


def test_stop_strings_cut_exactly(llm: LLM) -> None:
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, skip_special_tokens=True)
    full = llm.generate("stop strings", base)[0].outputs[0].text
    assert len(full) >= 10
    stop = full[5:8]
    cut = full.index(stop)
    out = llm.generate("stop strings", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                      stop=[stop]))[0].outputs[0]
    assert out.text == full[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate("stop strings", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                                       include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full[:cut + len(stop)]


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    greedy = llm.generate("tokens", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids = greedy.outputs[0].token_ids
    out = llm.generate("tokens", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                stop_token_ids=[ids[2]]))[0].outputs[0]
    assert out.token_ids == ids[: ids.index(ids[2]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ids[2]
    late = llm.generate("tokens", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                 stop_token_ids=[ids[0]], min_tokens=8))[0].outputs[0]
    assert len(late.token_ids) == 8 and ids[0] not in late.token_ids  # suppressed while below min_tokens


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("logprobs", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    completion = out.outputs[0]
    assert completion.logprobs is not None and len(completion.logprobs) == 4
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert entry[token_id].rank == 1 and len(entry) == 3
        assert max(lp.logprob for lp in entry.values()) == entry[token_id].logprob
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in
                                                              zip(completion.token_ids, completion.logprobs,
                                                                  strict=True)))


def test_abort_frees_blocks_and_reports(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("keep", "keep going", SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request("drop", "drop me please", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("drop-waiting", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request(["drop", "drop-waiting", "unknown-id"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["drop"].outputs[0].finish_reason == "abort"
    assert finished["drop-waiting"].outputs[0].finish_reason == "abort"
    assert len(finished["keep"].outputs[0].token_ids) == 6
    assert_blocks_released(engine)


def test_bad_input_raises_clearly_and_engine_keeps_serving(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("good", "fine", SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", "", SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty-ids", [], SamplingParams())
    with pytest.raises(ContextLengthError, match="maximum context length is 256") as info:
        engine.add_request("long", list(range(10)) * 30, SamplingParams())
    assert info.value.param == "prompt" and info.value.code == "context_length_exceeded"
    with pytest.raises(ContextLengthError, match="maximum context length is 256") as info:
        engine.add_request("long-output", list(range(10)) * 20, SamplingParams(max_tokens=100))
    assert info.value.param == "max_tokens"
    for param, params in (("logit_bias", SamplingParams(logit_bias={10**6: 1.0})),
                          ("allowed_token_ids", SamplingParams(allowed_token_ids=[1, 10**6]))):
        with pytest.raises(InvalidRequestError, match="vocabulary") as info:
            engine.add_request(param, "x", params)
        assert info.value.param == param
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("zero", "x", SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad-ids", [1, 10**9], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", "again", SamplingParams())
    with pytest.raises(ValueError, match="KV cache"):  # can never fit the cache: error, not a hang
        engine.add_request("huge", "x", SamplingParams(max_tokens=255, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.finished)
    assert [o.request_id for o in outs] == ["good"] and len(outs[0].outputs[0].token_ids) == 3
    assert_blocks_released(engine)
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])
    assert_blocks_released(engine)


def test_unknown_model_path_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/nonexistent/model/dir")


def test_bad_engine_options_are_clear_errors(tmp_path) -> None:
    from kubeinfer.engine.config import EngineConfig, parse_size

    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="memory size"):
        EngineConfig(kv_cache_memory="lots")
    assert parse_size("2GiB") == 2 << 30 and parse_size("512MB") == 512_000_000


def _resident_bytes_of(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's pages that are in RAM (mincore): unlike the process's RSS delta, not fooled when
    the allocator hands out heap pages that earlier tests left resident."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    pages = (length + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(start, length, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) * page


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only (mincore)")
def test_cpu_kv_cache_is_committed_at_allocation(llm: LLM) -> None:
    """A budget the machine cannot hold must fail at start-up, not under load: every page is touched."""
    runner = llm.llm_engine.runner
    num_blocks = (128 << 20) // runner.bytes_per_block
    caches = runner._allocate_kv_cache(num_blocks)
    resident = sum(_resident_bytes_of(k) + _resident_bytes_of(v) for k, v in caches)
    assert resident >= 0.9 * num_blocks * runner.bytes_per_block
    assert all(not k.any() and not v.any() for k, v in caches)  # and zeroed
