"""The batch-1 decode floor: how fast this machine reads memory, and what that means per token.

At batch 1 a decode step reads every weight once, so ``weight bytes / read bandwidth`` is the fastest a
step can be. This probe reads a buffer much larger than the caches (``--mb``, default 1024 MB) with all
torch threads (``torch.sum``: vectorised, split across threads) and with one, takes the best of
``--reps`` passes, then prints the floor in ms/token (and tokens/s) for the model's weights in each
dtype, and for the weights as ``kubeinfer serve`` loads them by default (a GGUF's quantized tensors as they
are: the bundled model's Q4_1 layers and its Q8_0 embedding, which is also its LM head). The model's weight
bytes are counted from its parameters (tied embeddings once; the embedding lookup reads one row, the LM head
the whole matrix).

    python bench/bandwidth.py
    python bench/bandwidth.py --mb 2048 --json -
"""

from __future__ import annotations

import argparse
import time

import torch
from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "q8_0": 34 / 32, "q4_1": 20 / 32}


def read_bandwidth(mb: int, reps: int, threads: int) -> float:
    """GB/s of the best pass of ``torch.sum`` over an ``mb``-megabyte float32 buffer."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(mb * 2**20 // 4)
        buf.sum()  # fault the pages in
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - start)
        return buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def model_weight_params(model: str | None) -> int:
    """Parameters read per decode token: every weight (tied ones once)."""
    from kubeinfer.engine.models.loader import load_model

    loaded = load_model(model, dtype="float32", quantization="none")  # dense, so every weight counts
    return sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())


def loaded_weight_bytes(model: str | None) -> tuple[str, int]:
    """The weights as served by default: (their formats, resident bytes, each tensor once)."""
    from kubeinfer.engine.layers.quantization import weight_report
    from kubeinfer.engine.models.loader import load_model

    report = weight_report(load_model(model, dtype="auto").model)
    return "/".join(report.qtypes) or "dense", report.total_bytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--json", help="write the results as JSON to this path ('-' = stdout)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"CPU: {cpu_features.model_name()}")
    print(f"flags: {' '.join(sorted(cpu_features.flags()))}")
    bandwidth = {t: read_bandwidth(args.mb, args.reps, t) for t in sorted({1, threads})}
    params = model_weight_params(args.model)
    best = max(bandwidth.values())
    print(f"\nread bandwidth ({args.mb} MB buffer, best of {args.reps}):")
    for t, gbs in bandwidth.items():
        print(f"  {t} thread(s): {gbs:6.1f} GB/s")
    print(f"\nweights: {params / 1e6:.1f} M parameters; floor at {best:.1f} GB/s:")
    print(f"{'dtype':9} {'MB/token':>9} {'floor ms':>9} {'tok/s':>7}")
    floors = {}
    for name, width in DTYPE_BYTES.items():
        mb = params * width / 1e6
        floors[name] = {"mb_per_token": mb, "floor_ms": mb / 1e3 / best * 1e3, "tokens_per_s": best * 1e3 / mb}
        print(f"{name:9} {mb:9.1f} {floors[name]['floor_ms']:9.2f} {floors[name]['tokens_per_s']:7.1f}")
    formats, loaded = loaded_weight_bytes(args.model)
    mb = loaded / 1e6
    floors["as loaded"] = {"formats": formats, "mb_per_token": mb, "floor_ms": mb / 1e3 / best * 1e3,
                           "tokens_per_s": best * 1e3 / mb}
    print(f"as loaded ({formats}): {mb:.1f} MB/token, floor {floors['as loaded']['floor_ms']:.2f} ms "
          f"({floors['as loaded']['tokens_per_s']:.1f} tok/s)")
    if args.json:
        write_json(args.json, {"cpu": cpu_features.describe(), "flags": sorted(cpu_features.flags()),
                                "bandwidth_gb_per_s": bandwidth, "params": params, "floors": floors})


if __name__ == "__main__":
    main()
