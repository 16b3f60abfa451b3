"""Decode throughput and memory of the bundled SmolLM2 Q4_1 GGUF kept quantized vs dequantised, side by side.

Each mode runs in a fresh process (so its resident memory is its own), one after the other in one invocation:
``gguf`` (the file's Q4_1/Q8_0 blocks through the C++ kernels, float32 activations), ``gguf-q8`` (the same
with int8 activations, llama.cpp's arithmetic), ``int8`` (weight-only int8 rows) and ``none`` (dense
float32 through oneDNN). Batch 1: one request; 32 streams: 32 requests at once. Output tokens per second
over the whole generate call (the short prompts' prefill included), best of ``--repeats``.

    python bench/quantized.py [--modes gguf,none] [--tokens 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json

MODES = {"gguf": ("gguf", "f32"), "gguf-q8": ("gguf", "q8"), "int8": ("int8", "f32"), "none": ("none", "f32")}
PROMPTS = ["Explain black holes to a ten-year-old.", "Write a short poem about the ocean.",
           "Give me three fun facts about honey bees.", "What is the capital of Japan?"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_mode(mode: str, tokens: int, repeats: int) -> dict:
    """In this process: load the model in ``mode`` and time batch-1 and 32-stream greedy decoding."""
    method, activations = MODES[mode]
    os.environ["KUBEINFER_QUANT_ACTIVATIONS"] = activations
    from kubeinfer.engine import LLM, SamplingParams
    from kubeinfer.engine.layers import quant_kernels

    llm = LLM(dtype="float32", quantization=method, kv_cache_memory="256MiB", max_num_seqs=32,
              max_num_batched_tokens=2048, enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm up
    result = {"mode": mode, "weight_mib": runner.weight_report.total_bytes / 2**20, "rss_mib": rss_bytes() / 2**20,
              "isa": quant_kernels.current_isa() if quant_kernels.available() else "-"}
    for streams in (1, 32):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate(prompts, params)
            best = min(best, time.perf_counter() - start)
        result[f"tok_s_{streams}"] = streams * tokens / best
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="gguf,gguf-q8,int8,none")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows as JSON ('-' = stdout)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args.tokens, args.repeats)))
        return 0
    import torch

    print(f"CPU: {cpu_features.describe()}; {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, "-P", __file__, "--child", mode, "--tokens", str(args.tokens),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{'mode':<8} {'kernel':<12} {'weights MiB':>11} {'RSS MiB':>8} {'batch-1 tok/s':>13} "
          f"{'32-stream tok/s':>15}")
    for r in rows:
        print(f"{r['mode']:<8} {r['isa']:<12} {r['weight_mib']:>11.1f} {r['rss_mib']:>8.0f} {r['tok_s_1']:>13.1f} "
              f"{r['tok_s_32']:>15.1f}")
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
