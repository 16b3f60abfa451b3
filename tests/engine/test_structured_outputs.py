"""Structured outputs in the engine, on a tiny random-weight model (so only the grammar makes the output valid).

Every output is replayed through a fresh xgrammar matcher: each sampled token must be one the grammar
allowed at that point (the mask was applied), and a sequence that stopped must have completed the grammar.
Schemas are fuzzed; ``n > 1``, preemption by recompute and prefix-cache hits must not break it.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest
import torch
from kubeinfer.engine import LLM, SamplingParams
from kubeinfer.engine.sample import Sampler, SampleRow
from kubeinfer.engine.sample.grammar import GrammarConstraint
from kubeinfer.engine.structured_outputs import InvalidGrammarError
from kubeinfer.engine.structured_outputs import StructuredOutputsParams as SO

from tests.engine.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return LLM(str(path), dtype="float32", block_size=4, num_gpu_blocks_override=400, max_num_batched_tokens=64,
               max_model_len=512)


def replay(llm: LLM, so: SO, token_ids: list[int], finish_reason: str) -> None:
    """Every token was allowed when it was sampled; a stopped sequence completed the grammar."""
    matcher = GrammarConstraint(llm.llm_engine.grammar_compiler.compile(so)).matcher
    for i, token in enumerate(token_ids):
        assert matcher.accept_token(token), f"token {i} ({token}) was outside the grammar's mask"
    if finish_reason == "stop":
        assert matcher.is_terminated()


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A schema whose every instance is short (bounded strings, arrays and integers): outputs can finish."""
    kinds = ["string", "integer", "enum", "boolean", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a b", 'q"uote', "7"], rng.randint(1, 4))}
    if kind == "object":
        names = rng.sample(["id", "name", "kind", "items", "x", "nested"], rng.randint(1, 3))
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": names, "additionalProperties": False}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    return {"type": kind}


@pytest.mark.parametrize("seed", range(6))
def test_fuzzed_schemas_never_leave_the_mask(llm: LLM, seed: int) -> None:
    rng = random.Random(seed)
    schema = {"type": "object", "properties": {"v": random_schema(rng)}, "required": ["v"],
              "additionalProperties": False}
    so = SO(json=schema)
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=300, n=2, structured_outputs=so)
    [out] = llm.generate(f"prompt {seed}", params)
    for choice in out.outputs:
        replay(llm, so, choice.token_ids, choice.finish_reason)
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.text), schema)


def test_regex_choice_grammar_and_json_object_hold(llm: LLM) -> None:
    cases = [
        (SO(regex=r"[a-c]{3}-\d{2}"), lambda t: re.fullmatch(r"[a-c]{3}-\d{2}", t)),
        (SO(choice=["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
        (SO(grammar='root ::= "x" [0-9] [0-9]? "y"'), lambda t: re.fullmatch(r"x\d\d?y", t)),
        (SO(grammar='start: "ab" | "cd"'), lambda t: t in ("ab", "cd")),  # Lark
    ]
    for so, holds in cases:
        outs = llm.generate(["one", "two words", "three"],
                            SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=so))
        for out in outs:
            choice = out.outputs[0]
            assert choice.finish_reason == "stop" and holds(choice.text), (so, choice.text)
            replay(llm, so, choice.token_ids, "stop")
    [out] = llm.generate("obj", SamplingParams(temperature=0, max_tokens=300, structured_outputs=SO(json_object=True)))
    replay(llm, SO(json_object=True), out.outputs[0].token_ids, out.outputs[0].finish_reason)
    if out.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(out.outputs[0].text), dict)


def test_constrained_and_free_rows_in_one_batch(llm: LLM) -> None:
    """Only the constrained rows are masked; a free greedy row is what it is alone."""
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate("free row", free)[0].outputs[0].token_ids
    so = SO(regex=r"[0-9]{4}")
    outs = llm.generate(["free row", "digits", "more digits"],
                        [free, SamplingParams(temperature=0, max_tokens=10, structured_outputs=so),
                         SamplingParams(temperature=1.0, seed=5, max_tokens=10, structured_outputs=so)])
    assert outs[0].outputs[0].token_ids == alone
    assert all(re.fullmatch(r"[0-9]{4}", o.outputs[0].text) for o in outs[1:])


def test_preemption_and_prefix_cache_keep_the_grammar(tmp_path) -> None:
    """A KV cache too small for the batch preempts (recompute): the matchers follow the kept tokens."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    llm = LLM(str(path), dtype="float32", block_size=4, num_gpu_blocks_override=40, max_num_batched_tokens=64,
              max_model_len=128, enable_prefix_caching=True)
    so = SO(regex=r"(ab|cd|ef){20,28}")
    prompt = "a shared prompt that fills some blocks"
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=so) for i in range(6)]
    outs = llm.generate([prompt] * 6, params)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.block_manager.prefix_cache_hits > 0
    for out in outs:
        choice = out.outputs[0]
        replay(llm, so, choice.token_ids, choice.finish_reason)
        if choice.finish_reason == "stop":
            assert re.fullmatch(r"(ab|cd|ef){20,28}", choice.text)
    # The same seeded request alone (no preemption) samples the same tokens.
    alone = llm.generate(prompt, params[3])[0].outputs[0].token_ids
    assert alone == outs[3].outputs[0].token_ids
    assert engine.sampler.num_sequences == 0  # every matcher freed


def test_invalid_constraints_are_typed_errors_with_the_reason(llm: LLM) -> None:
    engine = llm.llm_engine
    with pytest.raises(InvalidGrammarError, match="Unsupported type"):
        engine.add_request("bad-schema", "x", SamplingParams(structured_outputs=SO(json={"type": "foo"})))
    with pytest.raises(InvalidGrammarError, match="parenthesis"):
        engine.add_request("bad-regex", "x", SamplingParams(structured_outputs=SO(regex="(ab")))
    with pytest.raises(InvalidGrammarError, match="not defined"):
        engine.add_request("bad-grammar", "x", SamplingParams(structured_outputs=SO(grammar="root ::= nothing")))
    with pytest.raises(InvalidGrammarError, match="exactly one"):
        SO(regex="a", choice=["a"])
    with pytest.raises(InvalidGrammarError, match="not valid JSON"):
        SO(json="{nope")
    assert not engine.has_unfinished_requests()


def test_compiled_grammars_are_cached(llm: LLM) -> None:
    compiler = llm.llm_engine.grammar_compiler
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    first = compiler.compile(SO(json=schema))
    count = compiler.num_compiles
    assert compiler.compile(SO(json=json.dumps(schema), source="response_format")) is first
    assert compiler.num_compiles == count
    assert compiler.compile(SO(json=schema, strict=False)) is not first  # strictness changes the grammar


def test_sampler_masks_only_the_constrained_rows(llm: LLM) -> None:
    """The sampler's grammar rows (filled by its worker thread) allow exactly the matcher's tokens; the free
    row in between samples what it would alone."""
    vocab = llm.llm_engine.model_config.vocab_size
    compiler = llm.llm_engine.grammar_compiler
    sampler = Sampler(vocab, torch.device("cpu"))
    choice = SamplingParams(temperature=1.0, seed=1, structured_outputs=SO(choice=["ab", "cd"]))
    choice.compiled_grammar = compiler.compile(choice.structured_outputs)
    digits = SamplingParams(temperature=1.0, seed=2, structured_outputs=SO(regex="[0-9]+"))
    digits.compiled_grammar = compiler.compile(digits.structured_outputs)
    free = SamplingParams(temperature=0)
    for seq_id, params in ((101, choice), (102, free), (103, digits)):
        sampler.add_sequence(seq_id, params, [1, 2, 3])
    rows = [SampleRow(101, choice, 0), SampleRow(102, free, 0), SampleRow(103, digits, 0)]
    for _ in range(20):  # random logits, again and again: never a token outside the mask
        logits = torch.randn(3, vocab) * 10
        out = sampler.sample(logits.clone(), sampler.prepare(rows))
        assert not out.failed
        assert out.token_ids[0] in (ord("a"), ord("c")) and chr(out.token_ids[2]).isdigit()
        assert out.token_ids[1] == int(logits[1].argmax())
        sampler.free_sequence(101)
        sampler.free_sequence(103)
        sampler.add_sequence(101, choice, [1, 2, 3])
        sampler.add_sequence(103, digits, [1, 2, 3])
    out = sampler.sample(torch.randn(3, vocab), sampler.prepare(rows))
    second = SampleRow(101, choice, 1)
    following = sampler.sample(torch.randn(1, vocab), sampler.prepare([second]))
    assert chr(following.token_ids[0]) == {"a": "b", "c": "d"}[chr(out.token_ids[0])]
    assert sampler.timings["grammar_wait"] >= 0 and sampler.timings["mask_apply"] > 0


def test_a_complete_grammar_finishes_the_sequence_even_with_ignore_eos(llm: LLM) -> None:
    so = SO(choice=["done", "over"])
    [out] = llm.generate("x", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, structured_outputs=so))
    choice = out.outputs[0]
    assert choice.finish_reason == "stop" and choice.text in ("done", "over")
    assert len(choice.token_ids) == 5  # four bytes and the stop token the grammar ended with
