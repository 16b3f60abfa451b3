"""Prompt logprobs equal transformers' log-softmax of the prompt (fp32): one-step prefill, chunked prefill,
after a prefix-cache hit would have skipped the prompt's head, with n > 1 and beside plain requests."""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine import LLM, SamplingParams
from kubeinfer.engine.models.bundled import bundled_model_path
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.timeout(1200),  # loading the GGUF into transformers takes minutes on a busy CPU
              pytest.mark.usefixtures("float32_activations")]  # compared with transformers on the dequantised weights

TEXT = ("The quick brown fox jumps over the lazy dog. Kubernetes schedules pods onto nodes, and the "
        "kubelet starts their containers. A large language model predicts the next token.")
SHORT = "Kubernetes schedules pods onto nodes."
TOP = 3
ATOL = 2e-4


@pytest.fixture(scope="module")
def hf():
    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm() -> LLM:
    """A 32-token step budget: SHORT prefills in one step, TEXT in several chunks."""
    return LLM(dtype="float32", max_num_batched_tokens=32, block_size=8, num_gpu_blocks_override=64)


def reference(hf, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(prompt[j] | prompt[:j]) for j >= 1, and the top-TOP (ids, values) at each position."""
    with torch.no_grad():
        logprobs = hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    targets = torch.tensor(prompt[1:])
    return logprobs.gather(1, targets.unsqueeze(1)).squeeze(1), logprobs


def check(out, hf, prompt: list[int]) -> None:
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    expected, full = reference(hf, prompt)
    values = torch.tensor([got[j][prompt[j]].logprob for j in range(1, len(prompt))])
    assert torch.allclose(values, expected, atol=ATOL), (values - expected).abs().max()
    for j in range(1, len(prompt)):
        entry = got[j]
        row = full[j - 1]
        # The reference fixes the logits within ATOL only, so the rank is fixed up to the tokens within ATOL
        # of this one (deep in the tail, thousands of logits lie that close; the top ones are checked exactly).
        value = row[prompt[j]]
        lowest, highest = int((row > value + ATOL).sum()) + 1, int((row > value - ATOL).sum()) + 1
        assert lowest <= entry[prompt[j]].rank <= highest, (j, entry[prompt[j]].rank, lowest, highest)
        top_ids = row.topk(TOP).indices.tolist()
        assert set(top_ids) <= set(entry), (j, top_ids, list(entry))
        assert len(entry) <= TOP + 1
        for tid in top_ids:
            assert abs(entry[tid].logprob - row[tid].item()) < ATOL


def prompt_ids(llm: LLM, text: str = TEXT) -> list[int]:
    return list(llm.get_tokenizer().encode(text))


@pytest.mark.parametrize("text", [SHORT, TEXT], ids=["one-step", "chunked"])
def test_prompt_logprobs_match_transformers(text: str, llm: LLM, hf) -> None:
    prompt = prompt_ids(llm, text)
    chunks = -(-len(prompt) // 32)
    assert (chunks == 1) == (text == SHORT)
    before = llm.llm_engine.get_stats().num_prefill_chunks_total
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP)
    out = llm.generate([prompt], params)[0]
    check(out, hf, prompt)
    assert len(out.outputs[0].token_ids) == 2
    assert llm.llm_engine.get_stats().num_prefill_chunks_total - before == chunks - 1


def test_a_cached_prefix_still_gets_its_logprobs(llm: LLM, hf) -> None:
    prompt = prompt_ids(llm, "Cached prefix: " + TEXT)
    engine = llm.llm_engine
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))  # caches the prompt's blocks
    hits = engine.get_stats().prefix_cache_hits_total
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOP))[0]
    check(out, hf, prompt)
    assert out.num_cached_tokens == 0  # the hit was not taken: every position went through the forward
    assert engine.get_stats().prefix_cache_hits_total == hits
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0  # others still hit


def test_prompt_logprobs_with_n_and_in_a_mixed_batch(llm: LLM, hf) -> None:
    scored = prompt_ids(llm, "Mixed batch: " + TEXT)
    other = prompt_ids(llm, "Another request that only generates.")
    params = [SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=3, prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=3)]
    outs = llm.generate([scored, other], params)
    got = outs[0].prompt_logprobs
    expected, _ = reference(hf, scored)
    assert len(got) == len(scored) and all(len(e) == 1 for e in got[1:])  # k=0: the token itself only
    values = torch.tensor([got[j][scored[j]].logprob for j in range(1, len(scored))])
    assert torch.allclose(values, expected, atol=ATOL)
    assert len(outs[0].outputs) == 2 and outs[1].prompt_logprobs is None


def test_prompt_logprobs_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
