"""kubeinfer against llama.cpp's llama-server on the same GGUF file, same threads, same workload, one run.

Each server is started in turn on a free port with the machine's cores; then the streaming load of
`kubeinfer bench serve` (fixed output lengths with `ignore_eos`, greedy) runs at each concurrency
against it. The table gives output tok/s, TTFT and inter-token latency for both, and kubeinfer's
throughput as a ratio of llama-server's (ratios, not absolute numbers, compare across runs on a shared
machine). llama-server is built once by hack/build-llama-server.sh from PyPI's llama-cpp-python sdist.

    python bench/peers.py --concurrency 1,32 --json peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.bench.serve import (
    Summary,
    launch_server,
    make_prompts,
    run_load,
    stop_server,
    wait_until_ready,
)
from kubeinfer.engine.models.bundled import bundled_model_path
from kubeinfer.engine.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def llama_server_binary(given: str | None) -> str:
    if given:
        return given
    result = subprocess.run(["bash", str(REPO / "hack" / "build-llama-server.sh")], check=True,
                            stdout=subprocess.PIPE, text=True)
    return result.stdout.strip().splitlines()[-1]


def launch_llama_server(binary: str, model: Path, threads: int, slots: int, ctx_per_slot: int,
                        extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
               "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot), *shlex.split(extra)]
    if "amx_int8" in cpu_features.flags() and "--repack" not in extra:
        # Repacking puts the weights in ggml's AMX buffers, whose matmul (ggml_backend_amx_mul_mat) segfaults
        # on the AMX machines seen here (llama-cpp-python 0.3.36's llama.cpp); without it the AVX-512 kernels run.
        command.append("--no-repack")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{url}/health", f"llama-server ({shlex.join(command)})", timeout_s=300)
    return process, f"{url}/v1"


def load_args(args: argparse.Namespace, base_url: str) -> argparse.Namespace:
    """The `kubeinfer bench serve` options its load generator reads (the model: the first one listed)."""
    return argparse.Namespace(base_url=base_url, api_key=None, model=None, endpoint="completions",
                              temperature=0.0, request_rate=None, seed=args.seed, timeout=600.0)


def measure(system: str, base_url: str, args: argparse.Namespace, levels: list[int]) -> list[Summary]:
    rows = []
    for level in levels:
        num = max(args.min_prompts, 2 * level)
        prompts = make_prompts(num, args.input_len, args.seed)
        lens = [args.output_len] * num
        load = load_args(args, base_url)
        asyncio.run(run_load(load, prompts[:2], lens[:2], level))  # warm-up
        summary = asyncio.run(run_load(load, prompts, lens, level))
        summary.mode = system
        rows.append(summary)
        print(f"  {system} c={level}: {summary.output_throughput:.1f} tok/s "
              f"(errors {summary.errors}{': ' + summary.first_error if summary.errors else ''})", flush=True)
    return rows


def print_table(rows: list[Summary]) -> None:
    llama = {r.concurrency: r for r in rows if r.mode == "llama-server"}
    header = (f"{'system':<14}{'conc':>5}{'out tok/s':>11}{'x llama':>9}{'TTFT p50':>10}{'p95':>8}"
              f"{'ITL p50':>9}{'p95':>8}{'err':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peer = llama.get(r.concurrency)
        ratio = f"{r.output_throughput / peer.output_throughput:.2f}" if peer and peer.output_throughput else "-"
        print(f"{r.mode:<14}{r.concurrency:>5}{r.output_throughput:>11.1f}{ratio:>9}{r.ttft_ms['p50']:>10.0f}"
              f"{r.ttft_ms['p95']:>8.0f}{r.itl_ms['p50']:>9.1f}{r.itl_ms['p95']:>8.1f}{r.errors:>5}")
    print("(latencies in ms; x llama = output tok/s / llama-server's at the same concurrency)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the bundled SmolLM2 Q4_1)")
    parser.add_argument("--llama-server", default=None, help="its binary (default: hack/build-llama-server.sh)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--input-len", type=int, default=64, help="words per prompt")
    parser.add_argument("--output-len", type=int, default=128, help="tokens per request (ignore_eos)")
    parser.add_argument("--min-prompts", type=int, default=8, help="prompts per level: max(this, 2 x concurrency)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="kubeinfer,llama-server")
    parser.add_argument("--kubeinfer-args", default="", help="extra `kubeinfer serve` flags")
    parser.add_argument("--llama-server-args", default="", help="extra llama-server flags")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    model = args.model or bundled_model_path()
    levels = [int(c) for c in args.concurrency.split(",") if c]
    ctx = args.input_len * 2 + args.output_len + 64  # words are about one token; room for the chat-less prompt
    print(f"CPU: {cpu_features.describe()}; {args.threads} threads; model {model.name}", flush=True)
    rows: list[Summary] = []
    for system in args.systems.split(","):
        if system == "kubeinfer":
            process, url = launch_server(f"--model {shlex.quote(str(model))} --max-num-seqs {max(levels)} "
                                         f"--max-model-len {max(ctx, 512)} {args.kubeinfer_args}")
        elif system == "llama-server":
            process, url = launch_llama_server(llama_server_binary(args.llama_server), model, args.threads,
                                               max(levels), max(ctx, 512), args.llama_server_args)
        else:
            parser.error(f"unknown system {system!r}")
        try:
            rows += measure(system, url, args, levels)
        finally:
            stop_server(process)
    print()
    print(f"workload: completions, ~{args.input_len}-word prompts, {args.output_len} tokens each (ignore_eos), greedy")
    print_table(rows)
    if args.json_path:
        payload: dict[str, Any] = {"cpu": cpu_features.describe(), "model": str(model), "threads": args.threads,
                                   "workload": {"input_len": args.input_len, "output_len": args.output_len},
                                   "results": [r.__dict__ for r in rows]}
        write_json(args.json_path, payload)
    return 0 if all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
