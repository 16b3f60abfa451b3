"""Offline throughput: kubeinfer's engine vs transformers ``generate()`` on the bundled SmolLM2.

Workload: 64 chat prompts, output lengths drawn from a seeded uniform 16..256 with ``ignore_eos``,
at most 32 requests in flight. transformers runs the same requests serially (optionally only
the first K, extrapolated) and in static batches of 32 (left padding, each batch runs until its
longest request is done; only the requested tokens count as output).

    kubeinfer bench offline [--dtype float32|bfloat16] [--serial-requests K] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

TOPICS = ["the ocean", "black holes", "bread baking", "the Roman empire", "photosynthesis", "chess openings",
          "volcanoes", "machine learning", "jazz music", "honey bees", "the moon landing", "climate change",
          "origami", "electric cars", "the human heart", "coffee"]
ASKS = ["Explain {} to a ten-year-old.", "Write a short poem about {}.", "Give me three fun facts about {}.",
        "What are the most common misconceptions about {}?"]


def make_workload(num_requests: int, min_out: int, max_out: int, seed: int) -> tuple[list[list[dict]], list[int]]:
    rng = random.Random(seed)
    conversations = [[{"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[i // len(ASKS) % len(TOPICS)])}]
                     for i in range(num_requests)]
    lengths = [rng.randint(min_out, max_out) for _ in range(num_requests)]
    return conversations, lengths


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        cpus = fields.get("CPU(s)", "?").strip()
        model = f"{model}, {cpus} CPUs"
    except OSError:
        pass
    if torch.cuda.is_available():
        model += f", GPU {torch.cuda.get_device_name(0)}"
    # How idle OpenMP threads wait changes CPU results by ~30% (spinning vs sleeping between kernels).
    omp = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    return f"{model}, torch {torch.__version__}, {torch.get_num_threads()} threads, OpenMP {omp or 'defaults'}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class TimedBackend:
    """Wraps an attention backend module so the bench can report time spent in attention (RoPE + KV
    store + paged attention)."""

    def __init__(self, backend: Any, totals: dict[str, float]) -> None:
        self._backend, self._totals = backend, totals

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._backend, name)  # AttributeError for a hook the backend lacks, as for the module
        if not callable(fn):
            return fn

        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            self._totals["attention"] += time.perf_counter() - t0
            return out

        return timed


def instrument_attention(engine: Any) -> None:
    from kubeinfer.engine.layers.attention import Attention, select_backend

    for module in engine.runner.model.modules():
        if isinstance(module, Attention):
            module._backend = TimedBackend(select_backend(engine.runner.device), engine.runner.timings)


def run_engine(args: argparse.Namespace, conversations: list[list[dict]], lengths: list[int]) -> dict[str, Any]:
    from kubeinfer.engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_in_flight,
              max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.llm_engine
    instrument_attention(engine)
    tokenizer = llm.get_tokenizer()
    prompts = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
               for c in conversations]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    engine.runner.timings.clear()
    steps_before = engine.runner.num_steps
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(lengths), "the engine produced a different number of tokens than requested"
    timings = dict(engine.runner.timings)
    steps = engine.runner.num_steps - steps_before
    return {"elapsed_s": elapsed, "output_tokens": produced, "tok_per_s": produced / elapsed, "steps": steps,
            "dtype": str(engine.model_config.dtype).replace("torch.", ""), "prompt_tokens": sum(map(len, prompts)),
            "breakdown_s": timings, "prompts": prompts, "stats": vars(engine.get_stats())}


def load_hf_model(model: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        from kubeinfer.engine.models.bundled import bundled_model_path

        path = bundled_model_path()
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        location = str(path.parent)
    else:
        location, kwargs = model, {}
    hf = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return hf, tokenizer


@torch.inference_mode()
def run_hf_serial(hf: Any, prompts: list[list[int]], lengths: list[int], count: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    produced = 0
    for prompt, n in zip(prompts[:count], lengths[:count], strict=True):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        produced += out.shape[1] - len(prompt)
    elapsed = time.perf_counter() - t0
    rate = produced / elapsed
    total = sum(lengths)
    return {"timed_requests": count, "timed_s": elapsed, "tok_per_s": rate, "elapsed_s": total / rate,
            "extrapolated": count < len(prompts), "output_tokens": total}


@torch.inference_mode()
def run_hf_static(hf: Any, prompts: list[list[int]], lengths: list[int], batch_size: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch, wants = prompts[start:start + batch_size], lengths[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        hf.generate(ids, attention_mask=mask, max_new_tokens=max(wants), min_new_tokens=max(wants),
                    do_sample=False, eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - t0
    total = sum(lengths)
    return {"elapsed_s": elapsed, "output_tokens": total, "tok_per_s": total / elapsed, "batch_size": batch_size}


def format_table(result: dict[str, Any]) -> str:
    eng, rows = result["engine"], []
    rows.append(("kubeinfer engine (" + eng["dtype"] + f", ≤{result['max_in_flight']} in flight)",
                 eng["elapsed_s"], eng["tok_per_s"]))
    if "hf_static" in result:
        s = result["hf_static"]
        rows.append((f"transformers generate, static batches of {s['batch_size']} (fp32)", s["elapsed_s"],
                     s["tok_per_s"]))
    if "hf_serial" in result:
        s = result["hf_serial"]
        note = f", {s['timed_requests']} requests timed, extrapolated" if s["extrapolated"] else ""
        rows.append((f"transformers generate, serial (fp32{note})", s["elapsed_s"], s["tok_per_s"]))
    lines = [f"{'system':<72} {'total s':>9} {'out tok/s':>10} {'engine ×':>9}", "-" * 103]
    for name, elapsed, rate in rows:
        lines.append(f"{name:<72} {elapsed:>9.1f} {rate:>10.1f} {eng['tok_per_s'] / rate:>9.2f}")
    b, steps = eng["breakdown_s"], eng["steps"]
    total = sum(b.get(k, 0.0) for k in ("schedule", "prepare", "forward", "sample", "postprocess"))
    lines.append("")
    lines.append(f"engine step breakdown over {steps} steps (ms/step, share of step time):")
    parts = [("model forward (incl. attention, logits)", b.get("forward", 0.0)),
             ("  of which attention (KV store + paged attention)", b.get("attention", 0.0)),
             ("sampling", b.get("sample", 0.0)),
             ("scheduling + batch building", b.get("schedule", 0.0) + b.get("prepare", 0.0)),
             ("detokenise + stop checks + outputs", b.get("postprocess", 0.0))]
    for name, seconds in parts:
        lines.append(f"  {name:<52} {1000 * seconds / max(steps, 1):>8.2f} ms  {100 * seconds / max(total, 1e-9):>5.1f}%")
    lines.append(f"  output tokens {eng['output_tokens']}, prompt tokens {eng['prompt_tokens']}, "
                 f"preemptions {eng['stats']['num_preemptions_total']}, "
                 f"prefix-cache hits {eng['stats']['prefix_cache_hits_total']} tokens")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubeinfer bench offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the bundled SmolLM2)")
    p.add_argument("--dtype", default="float32", help="engine dtype: float32 | bfloat16 | auto")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--max-in-flight", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serial-requests", type=int, default=None,
                   help="time only the first K requests serially in transformers and extrapolate")
    p.add_argument("--static-batch-size", type=int, default=32)
    p.add_argument("--skip-transformers", action="store_true", help="only run the engine")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    conversations, lengths = make_workload(args.num_requests, args.min_output, args.max_output, args.seed)
    result: dict[str, Any] = {"machine": machine_description(), "load_before": load_average(),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "num_requests": args.num_requests, "max_in_flight": args.max_in_flight,
                              "output_lengths": f"uniform {args.min_output}..{args.max_output}, seed {args.seed}"}
    engine = run_engine(args, conversations, lengths)
    prompts = engine.pop("prompts")
    _progress(f"engine: {engine['output_tokens']} tokens in {engine['elapsed_s']:.1f}s "
              f"({engine['tok_per_s']:.1f} tok/s)")
    result["engine"] = engine
    if not args.skip_transformers:
        hf, _ = load_hf_model(args.model)
        with _quiet():
            result["hf_static"] = run_hf_static(hf, prompts, lengths, args.static_batch_size)
            _progress(f"transformers static: {result['hf_static']['tok_per_s']:.1f} tok/s")
            count = min(args.serial_requests or len(prompts), len(prompts))
            result["hf_serial"] = run_hf_serial(hf, prompts, lengths, count)
    result["load_after"] = load_average()
    print(f"machine: {result['machine']}; load average before/after: {result['load_before']} / "
          f"{result['load_after']}")
    print(f"workload: {args.num_requests} chat requests, output {result['output_lengths']}, ignore_eos\n")
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield SimpleNamespace()
    finally:
        hf_logging.set_verbosity(previous)


if __name__ == "__main__":
    raise SystemExit(main())
