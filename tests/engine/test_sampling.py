"""The sampler (engine/sample/) against plain-torch references: supports of top-k/top-p/min-p, penalties
(vLLM's semantics), min_tokens, seeds, logprobs, logit_bias, allowed_token_ids and the constraint hook,
per-row failure isolation, and the per-sequence state's lifecycle. Plus SamplingParams validation."""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine import faults
from kubeinfer.engine.errors import InvalidRequestError
from kubeinfer.engine.sample import Sampler, SampleRow
from kubeinfer.engine.sample.constraints import pack_bitmask, unpack_bitmask
from kubeinfer.engine.sample.penalties import apply_penalties
from kubeinfer.engine.sampling_params import SamplingParams

VOCAB = 50
CPU = torch.device("cpu")


class Rows:
    """A sampler with one registered sequence per params, and the rows that describe them."""

    def __init__(self, params: list[SamplingParams], prompt: list[int] | None = None, vocab: int = VOCAB) -> None:
        self.sampler = Sampler(vocab, CPU)
        self.params = params
        self.outputs = [0] * len(params)
        for i, p in enumerate(params):
            self.sampler.add_sequence(i, p, list(prompt or [1, 2, 3]))

    def rows(self) -> list[SampleRow]:
        return [SampleRow(i, p, self.outputs[i]) for i, p in enumerate(self.params)]

    def step(self, logits: torch.Tensor):  # type: ignore[no-untyped-def]
        out = self.sampler.sample(logits, self.sampler.prepare(self.rows()))
        self.outputs = [n + 1 for n in self.outputs]
        return out

    def sample(self, logits: torch.Tensor) -> list[int]:
        return self.step(logits).token_ids


def logits_rows(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def reference_penalties(row: torch.Tensor, prompt: list[int], outputs: list[int], repetition: float,
                        frequency: float, presence: float) -> torch.Tensor:
    """vLLM's penalties, one token at a time."""
    out = row.clone()
    for t in set(prompt) | set(outputs):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(outputs):
        out[t] -= frequency * outputs.count(t) + presence
    return out


def test_greedy_is_exact_argmax() -> None:
    logits = logits_rows(8)
    assert Rows([SamplingParams(temperature=0)] * 8).sample(logits) == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows() -> None:
    logits = logits_rows(4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)] * 2
    got = Rows(params).sample(logits)
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
    got = Rows([params] * 400).sample(logits)
    assert set(got) <= allowed
    assert len(set(got)) > 1  # it does sample, not just argmax


def test_seeded_rows_reproduce_whatever_the_batch() -> None:
    logits = logits_rows(3)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = Rows([params])
    batched = Rows([SamplingParams(temperature=1.0), params, SamplingParams(temperature=1.0)])
    draws_a = [alone.sample(logits[1:2])[0] for _ in range(20)]
    draws_b = [batched.sample(logits)[1] for _ in range(20)]
    assert draws_a == draws_b
    other = Rows([SamplingParams(temperature=1.0, seed=7)])
    assert [other.sample(logits[1:2])[0] for _ in range(20)] != draws_a


def test_repetition_penalty_vllm_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rows = Rows([SamplingParams(temperature=0, repetition_penalty=2.0)], prompt=[0, 1], vocab=4)
    batch = rows.sampler.prepare(rows.rows())
    assert batch.prompt_mask is not None and batch.output_counts is not None
    out = apply_penalties(logits, batch.prompt_mask, batch.output_counts, batch.repetition, batch.frequency,
                          batch.presence)  # type: ignore[arg-type]
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # positive / p, negative * p, unseen unchanged
    assert rows.sample(logits) == [0]  # 1.0 ties 1.0 -> first index; the sampler records token 0
    assert rows.sample(torch.tensor([[0.0, 0.0, 3.0, 0.0]])) == [2]  # output tokens count too
    batch = rows.sampler.prepare(rows.rows())
    out = apply_penalties(logits, batch.prompt_mask, batch.output_counts, batch.repetition, batch.frequency,
                          batch.presence)  # type: ignore[arg-type]
    assert out[0, 2] == 0.5


@pytest.mark.parametrize(("repetition", "frequency", "presence"), [
    (1.3, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 1.1), (0.8, -0.5, 0.4), (1.5, 1.2, -1.0),
])
def test_penalties_match_the_reference_step_after_step(repetition: float, frequency: float, presence: float) -> None:
    """The sampler records each token itself; the greedy pick must equal the reference's at every step."""
    vocab, prompt = 12, [1, 4, 4, 7]
    params = SamplingParams(temperature=0, repetition_penalty=repetition, frequency_penalty=frequency,
                            presence_penalty=presence)
    plain = SamplingParams(temperature=0)
    rows = Rows([params, plain], prompt=prompt, vocab=vocab)
    generator = torch.Generator().manual_seed(5)
    outputs: list[int] = []
    for _ in range(25):
        logits = torch.randn(2, vocab, generator=generator)
        logits[:, 4] += 2.0  # a prompt token the model likes: the penalties must matter
        expected = int(reference_penalties(logits[0], prompt, outputs, repetition, frequency, presence).argmax())
        got = rows.sample(logits)
        assert got == [expected, int(logits[1].argmax())]
        outputs.append(expected)
    assert len(set(outputs)) > 1


def test_penalties_change_the_sampled_distribution() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]]).expand(300, 4).clone()
    plain = Rows([SamplingParams(temperature=1.0, seed=i) for i in range(300)], prompt=[0], vocab=4)
    pen = Rows([SamplingParams(temperature=1.0, seed=i, repetition_penalty=2.0) for i in range(300)], prompt=[0],
               vocab=4)
    share_plain = plain.sample(logits).count(0) / 300
    share_pen = pen.sample(logits).count(0) / 300
    assert share_plain > 0.4 and share_pen < 0.3  # token 0 appeared in the prompt: penalised


def test_min_tokens_suppresses_stop_ids() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=2)
    params.all_stop_token_ids = {1}
    rows = Rows([params], vocab=3)
    assert rows.sample(logits) == [2]
    assert rows.sample(logits) == [2]
    assert rows.sample(logits) == [1]  # two outputs: min_tokens satisfied


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    logits = logits_rows(2)
    rows = Rows([SamplingParams(temperature=0, logprobs=3, logit_bias={0: 50.0}), SamplingParams(temperature=0)])
    out = rows.step(logits)
    ref = logits.log_softmax(-1)
    assert out.token_ids[0] == 0  # the bias picked it, the logprobs stay the model's
    assert out.sampled_logprobs == pytest.approx([float(ref[0, 0]), float(ref[1].max())], abs=1e-6)
    assert out.sampled_ranks is not None and out.sampled_ranks[1] == 1
    assert out.sampled_ranks[0] == int((ref[0] > ref[0, 0]).sum()) + 1
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids[0] == ref[0].topk(3).indices.tolist()


def test_logit_bias_adds_to_the_logits() -> None:
    logits = logits_rows(3)
    top = logits.argmax(-1).tolist()
    bias_up = {7: 100.0}
    bias_down = {top[1]: -100.0}
    rows = Rows([SamplingParams(temperature=0, logit_bias=bias_up), SamplingParams(temperature=0, logit_bias=bias_down),
                 SamplingParams(temperature=0)])
    ref = logits.clone()
    ref[0, 7] += 100.0
    ref[1, top[1]] -= 100.0
    assert rows.sample(logits) == ref.argmax(-1).tolist()
    # Random rows: a -100 bias on every token but two leaves only those two.
    keep = {3, 9}
    bias = {t: -100.0 for t in range(VOCAB) if t not in keep}
    got = Rows([SamplingParams(temperature=1.0, logit_bias=bias)] * 300).sample(logits[:1].expand(300, VOCAB).clone())
    assert set(got) == keep


def test_allowed_token_ids_restrict_every_row_that_asks() -> None:
    allowed = [2, 11, 40]
    params = [SamplingParams(temperature=1.0, allowed_token_ids=allowed), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0, allowed_token_ids=allowed)]
    rows = Rows(params * 100)
    logits = logits_rows(300, seed=1)
    got = rows.sample(logits)
    assert set(got[0::3]) == set(allowed)
    assert len(set(got[1::3]) - set(allowed)) > 5
    assert got[2::3] == [allowed[int(torch.argmax(logits[i, allowed]))] for i in range(2, 300, 3)]


def test_bitmask_pack_and_unpack_round_trip() -> None:
    allowed = torch.rand(3, 77, generator=torch.Generator().manual_seed(0)) > 0.5
    allowed[0, 31] = allowed[1, 63] = True  # the sign bit of a word
    packed = pack_bitmask(allowed)
    assert packed.shape == (3, 3) and packed.dtype == torch.int32
    assert torch.equal(unpack_bitmask(packed, 77), allowed)


class EvenTokens:
    """A stateful constraint: even tokens only, and it remembers what it accepted."""

    def __init__(self, log: list[int] | None = None) -> None:
        self.accepted = log if log is not None else []

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = pack_bitmask(torch.arange(VOCAB) % 2 == 0)

    def accept_token(self, token_id: int) -> None:
        assert token_id % 2 == 0
        self.accepted.append(token_id)

    def fork(self) -> EvenTokens:
        return EvenTokens(list(self.accepted))


def test_constraint_hook_is_applied_batched_and_anded_with_allowed_ids(monkeypatch) -> None:
    from kubeinfer.engine.sample import constraints as module

    made: list[EvenTokens] = []
    original = module.make_constraints

    def with_even(params: SamplingParams, vocab: int):  # type: ignore[no-untyped-def]
        found = original(params, vocab)
        if params.seed == 1:
            made.append(EvenTokens())
            found.append(made[-1])
        return found

    monkeypatch.setattr("kubeinfer.engine.sample.sampler.make_constraints", with_even)
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, seed=1, allowed_token_ids=[3, 4, 5, 6])]
    rows = Rows(params * 50)
    for step in range(3):
        got = rows.sample(logits_rows(150, seed=step))
        assert all(t % 2 == 0 for t in got[0::3])
        assert set(got[2::3]) <= {4, 6}
        assert any(t % 2 for t in got[1::3])
    assert len(made) == 100 and all(len(c.accepted) == 3 for c in made)


def test_a_failing_row_fails_alone(monkeypatch) -> None:
    class Broken(EvenTokens):
        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            raise RuntimeError("grammar exploded")

    monkeypatch.setattr("kubeinfer.engine.sample.sampler.make_constraints",
                        lambda params, vocab: [Broken()] if params.seed == 3 else [])
    monkeypatch.setattr(faults, "_POINTS", {"sample": 4})  # the batched pass fails because of row 2
    logits = logits_rows(4)
    rows = Rows([SamplingParams(temperature=0), SamplingParams(temperature=0, seed=3),
                 SamplingParams(temperature=0.0, seed=4), SamplingParams(temperature=1.0, seed=5, logprobs=2)])
    out = rows.step(logits)
    assert set(out.failed) == {1, 2}
    assert "grammar exploded" in str(out.failed[1]) and "injected sample fault" in str(out.failed[2])
    assert out.token_ids[0] == int(logits[0].argmax())
    alone = Rows([SamplingParams(temperature=1.0, seed=5, logprobs=2)]).step(logits[3:4])
    assert out.token_ids[3] == alone.token_ids[0]  # the fallback draws what the row would alone
    assert out.sampled_logprobs is not None and alone.sampled_logprobs is not None
    assert out.sampled_logprobs[3] == pytest.approx(alone.sampled_logprobs[0])


def test_state_lifecycle_fork_and_free() -> None:
    sampler = Sampler(VOCAB, CPU)
    params = SamplingParams(temperature=1.0, seed=10, presence_penalty=1.0)
    sampler.add_sequence(1, params, [1, 2])
    sampler.fork_sequence(1, 2, index=1)
    assert sampler.num_sequences == 2
    logits = logits_rows(1).expand(2, VOCAB).clone()
    rows = [SampleRow(1, params, 0), SampleRow(2, params, 0)]
    out = sampler.sample(logits, sampler.prepare(rows))
    reference = Sampler(VOCAB, CPU)
    reference.add_sequence(7, SamplingParams(temperature=1.0, seed=11, presence_penalty=1.0), [1, 2])
    assert reference.sample(logits[:1], reference.prepare([SampleRow(7, params, 0)])).token_ids[0] == out.token_ids[1]
    sampler.free_sequence(1)
    sampler.free_sequence(2)
    sampler.free_sequence(2)  # twice is fine
    assert sampler.num_sequences == 0
    out = sampler.sample(logits[:1], sampler.prepare([SampleRow(1, params, 0)]))
    assert 0 in out.failed  # a row without state fails alone, it does not crash the step


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -5}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
    ({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-3]}, "allowed_token_ids"), ({"seed": 10**20}, "seed"),
])
def test_bad_sampling_params_raise_clear_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field


def test_sampling_params_normalise() -> None:
    p = SamplingParams(stop="END", top_k=-1, temperature=0.0, top_p=0.3)
    assert p.stop == ["END"] and p.top_k == 0 and p.is_greedy and p.top_p == 1.0


def test_a_tiny_top_p_keeps_the_argmax_among_tied_logits() -> None:
    """bf16 logits tie often: top-p's always-kept token must be the one argmax (greedy) picks."""
    from kubeinfer.engine.sample.filters import apply_top_k_top_p

    logits = torch.tensor([[0.5, 3.0, 1.0, 3.0, 3.0, -1.0]] * 2)
    kept = apply_top_k_top_p(logits, None, torch.tensor([1e-6, 0.5]))
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [logits[0].argmax().item()] == [1]
    assert torch.isfinite(kept[1]).nonzero().flatten().tolist() == [1, 3]  # 1/3 + 1/3 of the mass reaches 0.5
    top_k = apply_top_k_top_p(logits, torch.tensor([1, 2]), None)
    assert torch.isfinite(top_k).nonzero()[:, 1].tolist() == [1, 3, 4, 1, 3, 4]  # ties at the k-th value stay


def test_allowed_token_ids_with_a_grammar_is_rejected_naming_the_field() -> None:
    """The grammar may allow none of the listed tokens at some step (found by the OpenAPI fuzz: a 500 when
    the sampler then drew a token the grammar refused): rejected up front instead."""
    from kubeinfer.engine.structured_outputs import StructuredOutputsParams

    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(allowed_token_ids=[1, 2], structured_outputs=StructuredOutputsParams(json_object=True))
    assert info.value.param == "allowed_token_ids"
