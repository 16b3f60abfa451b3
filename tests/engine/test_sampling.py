"""Sampler and SamplingParams: supports of top-k/top-p/min-p, penalties, min_tokens, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine.layers.sampler import Sampler, SamplingBatch, record_token
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.sequence import Request, Sequence

VOCAB = 50
CPU = torch.device("cpu")


def seqs_for(params: list[SamplingParams], prompt: list[int] | None = None) -> list[Sequence]:
    out = []
    for i, p in enumerate(params):
        seq = Request(f"r{i}", None, list(prompt or [1, 2, 3]), p).seqs[0]
        if p.seed is not None:
            seq.generator = torch.Generator().manual_seed(p.seed)
        out.append(seq)
    return out


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    return Sampler()(logits, SamplingBatch.build(seqs, logits.shape[1], CPU)).token_ids


def logits_rows(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_exact_argmax() -> None:
    logits = logits_rows(8)
    assert sample(logits, seqs_for([SamplingParams(temperature=0)] * 8)) == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows() -> None:
    logits = logits_rows(4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)] * 2
    got = sample(logits, seqs_for(params))
    assert got[0] == int(logits[0].argmax()) and got[2] == int(logits[2].argmax())


@pytest.mark.parametrize(("params", "support"), [
    (SamplingParams(temperature=1.5, top_k=5), lambda row: set(row.topk(5).indices.tolist())),
    (SamplingParams(temperature=1.0, top_p=0.5), None),
    (SamplingParams(temperature=1.0, min_p=0.2), None),
])
def test_filters_never_emit_outside_their_support(params: SamplingParams, support) -> None:
    row = logits_rows(1, seed=3)[0]
    probs = row.softmax(-1)
    if params.top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
        order = probs.argsort(descending=True)
        mass = probs[order].cumsum(0)
        allowed = set(order[: int((mass < params.top_p).sum()) + 1].tolist())
    elif params.min_p > 0:
        allowed = set((probs >= params.min_p * probs.max()).nonzero().flatten().tolist())
    else:
        allowed = support(row)
    assert 1 < len(allowed) < VOCAB
    logits = row.expand(400, VOCAB).clone()
    got = sample(logits, seqs_for([params] * 400))
    assert set(got) <= allowed
    assert len(set(got)) > 1  # it does sample, not just argmax


def test_seeded_rows_reproduce_whatever_the_batch() -> None:
    logits = logits_rows(3)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[1:2], seqs_for([params]))[0]]
    # Same seed inside a batch with unseeded neighbours: same draws, step after step.
    seq_a = seqs_for([params])[0]
    seq_b = seqs_for([SamplingParams(temperature=1.0), params, SamplingParams(temperature=1.0)])
    draws_a = [sample(logits[1:2], [seq_a])[0] for _ in range(20)]
    draws_b = [sample(logits, seq_b)[1] for _ in range(20)]
    assert draws_a == draws_b and draws_a[0] == alone[0]
    other = seqs_for([SamplingParams(temperature=1.0, seed=7)])[0]
    assert [sample(logits[1:2], [other])[0] for _ in range(20)] != draws_a


def test_repetition_penalty_vllm_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seq = seqs_for([SamplingParams(temperature=0, repetition_penalty=2.0)], prompt=[0, 1])[0]
    batch = SamplingBatch.build([seq], 4, CPU)
    from kubeinfer.engine.layers.sampler import apply_penalties

    out = apply_penalties(logits, batch)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # positive / p, negative * p, unseen unchanged
    assert Sampler()(logits, batch).token_ids == [0]  # 1.0 ties 1.0 -> first index
    seq.token_ids.append(2)
    record_token(seq, 2)  # output tokens count too
    out = apply_penalties(logits, SamplingBatch.build([seq], 4, CPU))
    assert out[0, 2] == 0.5


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 4)
    seq = seqs_for([SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25)], prompt=[3])[0]
    for tok in (1, 1, 2):
        seq.token_ids.append(tok)
        record_token(seq, tok)
    from kubeinfer.engine.layers.sampler import apply_penalties

    out = apply_penalties(logits, SamplingBatch.build([seq], 4, CPU))
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0]]  # token 3 only in the prompt: untouched
    # The state built lazily after the fact agrees with the incremental one.
    seq.penalty_state = None
    assert apply_penalties(logits, SamplingBatch.build([seq], 4, CPU)).tolist() == out.tolist()


def test_penalties_change_the_sampled_distribution() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]]).expand(300, 4).clone()
    plain = seqs_for([SamplingParams(temperature=1.0, seed=i) for i in range(300)], prompt=[0])
    pen = seqs_for([SamplingParams(temperature=1.0, seed=i, repetition_penalty=2.0) for i in range(300)], prompt=[0])
    share_plain = sample(logits, plain).count(0) / 300
    share_pen = sample(logits, pen).count(0) / 300
    assert share_plain > 0.4 and share_pen < 0.3  # token 0 appeared in the prompt: penalised


def test_min_tokens_suppresses_stop_ids() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=2)
    params.all_stop_token_ids = {1}
    seq = seqs_for([params])[0]
    assert sample(logits, [seq]) == [2]
    seq.token_ids.extend([2, 2])  # two outputs: min_tokens satisfied
    assert sample(logits, [seq]) == [1]


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    logits = logits_rows(2)
    seqs = seqs_for([SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)])
    out = Sampler()(logits, SamplingBatch.build(seqs, VOCAB, CPU))
    ref = logits.log_softmax(-1)
    assert out.sampled_ranks == [1, 1]
    assert out.sampled_logprobs == pytest.approx(ref.max(-1).values.tolist(), abs=1e-6)
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids[0] == ref[0].topk(3).indices.tolist()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -5}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params_raise_clear_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalise() -> None:
    p = SamplingParams(stop="END", top_k=-1, temperature=0.0, top_p=0.3)
    assert p.stop == ["END"] and p.top_k == 0 and p.is_greedy and p.top_p == 1.0
