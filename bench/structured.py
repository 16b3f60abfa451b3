"""Step-time overhead of structured outputs (xgrammar) in the engine, and the first request's compile time.

For each batch size, the same prompts decode the same number of steps twice, side by side: free (ignore_eos)
and constrained by a JSON schema that cannot end within the run (a list of at least 64 objects), so every
step masks every row. A step is one ``LLMEngine.step()`` in decode (the prefill steps are left out).
Columns: ms per step free and constrained (the fastest step of each, the honest number on a shared machine;
medians in the JSON), the overhead in ms and in % of the free step; then the grammar's own parts: the
mask fill of the whole batch alone (``fill``, done by the worker thread while the forward runs), what the
step still waited for it after the forward (``wait``), masking the logits (``apply``) and advancing the
matchers by the sampled tokens (``accept``), per step. ``wait + apply + accept`` is the grammar's cost on
the critical path.

Compile: building xgrammar's tokenizer info (once per engine, in the background at start-up), the first
compile of the schema (what the first request with it waits for) and a cached compile.

    python bench/structured.py                       # bundled SmolLM2, batch 1 and 32, float32
    python bench/structured.py --batch 8 --steps 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from kubeinfer.engine import SamplingParams, cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.llm_engine import LLMEngine
from kubeinfer.engine.sample.grammar import GrammarCompiler, GrammarConstraint, fill_bitmasks
from kubeinfer.engine.structured_outputs import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 64, "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "count": {"type": "integer"},
                       "kind": {"enum": ["fruit", "vegetable", "grain"]}, "tags": {"type": "array",
                                                                                  "items": {"type": "string"}}},
        "required": ["name", "count", "kind", "tags"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}
PROMPT = "List groceries as JSON objects with a name, a count, a kind and tags:"


@dataclass
class Row:
    batch: int
    free_ms: float
    constrained_ms: float
    overhead_ms: float
    overhead_pct: float
    fill_ms: float  # filling the batch's masks alone
    wait_ms: float  # per step, waiting for the masks after the forward
    apply_ms: float  # per step, masking the logits
    accept_ms: float  # per step, advancing the batch's matchers
    free_median_ms: float
    constrained_median_ms: float


def _decode_steps(engine: LLMEngine, params: list[SamplingParams], steps: int) -> tuple[list[float], float, float]:
    """Decode step times, and the summed time the steps waited for masks after the forward and applied them."""
    for i, p in enumerate(params):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", PROMPT, p)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(
            engine.scheduler.waiting)):
        engine.step()  # the prefills
    wait0, apply0 = engine.sampler.timings["grammar_wait"], engine.sampler.timings["mask_apply"]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    wait = engine.sampler.timings["grammar_wait"] - wait0
    apply = engine.sampler.timings["mask_apply"] - apply0
    engine.abort_request(list(engine.requests))
    engine.step()
    return times, wait, apply


def _fill_and_accept_ms(engine: LLMEngine, so: StructuredOutputsParams, batch: int, tokens: list[int],
                        repeats: int = 20) -> tuple[float, float]:
    """Mask fill of ``batch`` matchers that accepted ``tokens`` (median ms), and accepting one token in each."""
    compiled = engine.grammar_compiler.compile(so)
    constraints = [GrammarConstraint(compiled) for _ in range(batch)]
    t0 = time.perf_counter()
    for t in tokens:
        for c in constraints:
            c.accept_token(t)
    accept = (time.perf_counter() - t0) / len(tokens)
    bitmask = torch.empty((batch, (engine.model_config.vocab_size + 31) // 32), dtype=torch.int32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fill_bitmasks(constraints, bitmask, list(range(batch)))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * accept


def bench(engine: LLMEngine, batch: int, steps: int) -> Row:
    so = StructuredOutputsParams(json=SCHEMA)
    free = [SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True) for _ in range(batch)]
    constrained = [SamplingParams(temperature=0, max_tokens=steps + 8, structured_outputs=so) for _ in range(batch)]
    # Interleave the two runs so that machine noise hits both alike; keep the fastest of each.
    free_t, cons_t, waits, applies = [], [], [], []
    for _ in range(2):
        t, _, _ = _decode_steps(engine, free, steps)
        free_t += t
        t, w, a = _decode_steps(engine, constrained, steps)
        cons_t += t
        waits.append(w / steps)
        applies.append(a / steps)
    # The tokens a constrained row has accepted mid-run: what the fill is measured on.
    [out] = _generate(engine, so, steps)
    fill, accept = _fill_and_accept_ms(engine, so, batch, out)
    f, c = min(free_t), min(cons_t)
    return Row(batch, 1e3 * f, 1e3 * c, 1e3 * (c - f), 100 * (c - f) / f, fill, 1e3 * min(waits),
               1e3 * min(applies), accept, 1e3 * statistics.median(free_t), 1e3 * statistics.median(cons_t))


def _generate(engine: LLMEngine, so: StructuredOutputsParams, steps: int) -> list[list[int]]:
    engine.add_request("sample-run", PROMPT, SamplingParams(temperature=0, max_tokens=steps, structured_outputs=so))
    done = None
    while done is None:
        for out in engine.step():
            if out.finished:
                done = out
    return [done.outputs[0].token_ids]


def compile_times(engine: LLMEngine) -> dict[str, float]:
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, list(engine.model_config.eos_token_ids))
    t0 = time.perf_counter()
    compiler._xgr_compiler()  # the tokenizer info, normally built in the background at start-up
    t1 = time.perf_counter()
    so = StructuredOutputsParams(json=SCHEMA)
    compiler.compile(so)
    t2 = time.perf_counter()
    compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA)))
    t3 = time.perf_counter()
    return {"tokenizer_info_s": t1 - t0, "first_compile_ms": 1e3 * (t2 - t1), "cached_compile_ms": 1e3 * (t3 - t2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 32)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path ('-' = stdout)")
    args = parser.parse_args(argv)
    batches = args.batch or [1, 32]
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=max(batches),
                                    max_model_len=1024, enable_prefix_caching=False))
    compile_info = compile_times(engine)
    rows = [bench(engine, b, args.steps) for b in batches]
    print(f"CPU: {cpu_features.describe()}  threads={torch.get_num_threads()}  "
          f"model={args.model or 'bundled SmolLM2-135M-Instruct'} {args.dtype}  device={engine.runner.device}")
    print(f"grammar: tokenizer info {compile_info['tokenizer_info_s']:.2f} s (once, at start-up), first compile "
          f"{compile_info['first_compile_ms']:.1f} ms, cached {compile_info['cached_compile_ms']:.3f} ms")
    print(f"{'batch':>5} {'free ms':>8} {'json ms':>8} {'+ms':>7} {'+%':>6} {'fill ms':>8} {'wait ms':>8} "
          f"{'apply ms':>8} {'accept ms':>9}")
    for r in rows:
        print(f"{r.batch:5} {r.free_ms:8.1f} {r.constrained_ms:8.1f} {r.overhead_ms:7.2f} {r.overhead_pct:6.1f} "
              f"{r.fill_ms:8.2f} {r.wait_ms:8.2f} {r.apply_ms:8.2f} {r.accept_ms:9.2f}")
    if args.json:
        write_json(args.json, {"cpu": cpu_features.describe(), "compile": compile_info,
                           "rows": [asdict(r) for r in rows]})


if __name__ == "__main__":
    main()
