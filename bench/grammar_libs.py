"""xgrammar vs llguidance on the bundled SmolLM2 tokenizer: why structured outputs use xgrammar.

Per library: tokenizer set-up, JSON-schema compile (fresh and cached) and the per-step mask of ``--batch``
sequences (the library's batched call, and one matcher at a time), each sequence walking through the tokens
of its own valid instance of the schema. llguidance is not a dependency: ``pip install llguidance`` first.

    python bench/grammar_libs.py --batch 32 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.models.bundled import bundled_model_path
from kubeinfer.engine.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "age", "role", "tags", "address", "scores"], "additionalProperties": False,
}
WORDS = ["alpha", "bravo", "Charlie", "delta", "echo", "foxtrot", "golf", "hotel", "India", "juliet"]


def instance(rng: random.Random) -> str:
    return json.dumps({
        "name": " ".join(rng.sample(WORDS, 2)), "age": rng.randint(1, 99), "role": rng.choice(["admin", "user"]),
        "tags": rng.sample(WORDS, rng.randint(0, 3)),
        "address": {"city": rng.choice(WORDS), "zip": str(rng.randint(10000, 99999))},
        "scores": [round(rng.random() * 100, 2) for _ in range(rng.randint(0, 3))]})


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def walk(fill: Callable[[], None], accept: Callable[[int], None], steps: int) -> float:
    """Mean ms of ``fill`` over ``steps`` steps, advancing every matcher by one token after each."""
    total = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        fill()
        total += time.perf_counter() - t0
        accept(step)
    return 1e3 * total / steps


def bench_xgrammar(tok: Any, vocab: int, trajs: list[list[int]], steps: int) -> dict[str, float]:
    import xgrammar as xgr

    schema = json.dumps(SCHEMA)
    init, info = timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    compile_s, compiled = timed(lambda: compiler.compile_json_schema(schema))
    cached_s, _ = timed(lambda: compiler.compile_json_schema(schema))
    bitmask = xgr.allocate_token_bitmask(len(trajs), vocab)
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    matchers = [xgr.GrammarMatcher(compiled) for _ in trajs]

    def accept(step: int) -> None:
        for m, t in zip(matchers, trajs, strict=True):
            assert m.accept_token(t[step])

    batched = walk(lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask), accept, steps)
    matchers = [xgr.GrammarMatcher(compiled) for _ in trajs]

    def one_by_one() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    sequential = walk(one_by_one, accept, steps)
    return {"tokenizer_init_s": init, "compile_ms": 1e3 * compile_s, "cached_compile_ms": 1e3 * cached_s,
            "mask_batched_ms": batched, "mask_one_by_one_ms": sequential}


def bench_llguidance(tok: Any, vocab: int, trajs: list[list[int]], steps: int) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    schema = json.dumps(SCHEMA)
    init, lltok = timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=vocab))

    def compile_one() -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        assert not llguidance.LLMatcher(lltok, grammar).is_error()
        return grammar

    compile_s, grammar = timed(compile_one)
    cached_s, _ = timed(compile_one)
    bitmask = lt.allocate_token_bitmask(len(trajs), vocab)
    executor = llguidance.LLExecutor()
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in trajs]

    def accept(step: int) -> None:
        for m, t in zip(matchers, trajs, strict=True):
            assert m.consume_token(t[step]), m.get_error()

    batched = walk(lambda: lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)],
                                                         bitmask), accept, steps)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in trajs]

    def one_by_one() -> None:
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, bitmask, i)

    sequential = walk(one_by_one, accept, steps)
    return {"tokenizer_init_s": init, "compile_ms": 1e3 * compile_s, "cached_compile_ms": 1e3 * cached_s,
            "mask_batched_ms": batched, "mask_one_by_one_ms": sequential}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the results as JSON to this path ('-' = stdout)")
    args = parser.parse_args(argv)
    path = bundled_model_path()
    tok = load_tokenizer(path.parent, gguf_file=path.name)
    vocab = len(tok)
    rng = random.Random(0)
    trajs = [list(tok.encode(instance(rng), add_special_tokens=False)) for _ in range(args.batch)]
    steps = min(map(len, trajs))
    results = {"xgrammar": bench_xgrammar(tok, vocab, trajs, steps),
               "llguidance": bench_llguidance(tok, vocab, trajs, steps)}
    print(f"CPU: {cpu_features.describe()}  batch={args.batch}  steps={steps}  vocab={vocab}")
    print(f"{'library':11} {'tok init s':>10} {'compile ms':>10} {'cached ms':>9} {'mask ms':>8} {'1-by-1 ms':>9}")
    for name, r in results.items():
        print(f"{name:11} {r['tokenizer_init_s']:10.2f} {r['compile_ms']:10.1f} {r['cached_compile_ms']:9.3f} "
              f"{r['mask_batched_ms']:8.2f} {r['mask_one_by_one_ms']:9.2f}")
    if args.json:
        write_json(args.json, {"cpu": cpu_features.describe(), "batch": args.batch, "results": results})


if __name__ == "__main__":
    main()
