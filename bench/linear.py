"""CPU linear layers at SmolLM2's shapes: oneDNN (packed fp32, and bf16 where it packs), the C++
small-batch kernel (``cpu_kernels.linear``) in fp32 and bf16, and ``F.linear`` in bf16.

Each cell: the fastest of ``--reps`` calls in microseconds (the minimum is the honest number on a
shared machine); paths are timed interleaved, so a noisy neighbour slows all of them alike. The
``GB/s`` column is the weight bytes each path reads per call over its time. The engine's choice of
path per shape and batch (``layers/cpu_linear.py``) comes from these numbers.

    python bench/linear.py                       # batches 1 2 4 8 16 32
    python bench/linear.py --batch 1 --json -    # JSON to stdout
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.layers import cpu_kernels, onednn

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def _paths(n: int, k: int) -> dict[str, tuple[callable, int]]:
    w32 = torch.randn(n, k) / k**0.5
    w16 = w32.to(torch.bfloat16)
    paths = {"onednn_fp32": (lambda x, p=onednn.pack(w32): onednn.linear(x, p, None), 4),
             "kernel_fp32": (lambda x: cpu_kernels.linear(x, w32), 4),
             "kernel_bf16": (lambda x: cpu_kernels.linear(x.to(torch.bfloat16), w16), 2),
             "torch_bf16": (lambda x: F.linear(x.to(torch.bfloat16), w16), 2)}
    if onednn.packs(torch.bfloat16):
        paths["onednn_bf16"] = (lambda x, p=onednn.pack(w16): onednn.linear(x.to(torch.bfloat16), p, None), 2)
    return paths


def run(batches: list[int], reps: int) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        paths = _paths(n, k)
        for m in batches:
            x32, x16 = torch.randn(m, k), torch.randn(m, k).to(torch.bfloat16)
            inputs = {p: (x16 if p.endswith("bf16") else x32) for p in paths}
            best = dict.fromkeys(paths, float("inf"))
            for _ in range(reps):
                for p, (fn, _) in paths.items():
                    start = time.perf_counter()
                    fn(inputs[p])
                    best[p] = min(best[p], time.perf_counter() - start)
            for p, (_, width) in paths.items():
                rows.append({"shape": name, "n": n, "k": k, "batch": m, "path": p, "us": best[p] * 1e6,
                             "gb_per_s": n * k * width / best[p] / 1e9})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", help="write the rows as JSON to this path ('-' = stdout)")
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_features.describe()}; threads {torch.get_num_threads()}", file=sys.stderr)
    rows = run(args.batch, args.reps)
    paths = list(dict.fromkeys(r["path"] for r in rows))
    print(f"{'shape':8} {'batch':>5} " + " ".join(f"{p + ' us':>16}" for p in paths) + "  best")
    for shape in SHAPES:
        for m in args.batch:
            cells = {r["path"]: r for r in rows if r["shape"] == shape and r["batch"] == m}
            best = min(cells, key=lambda p: cells[p]["us"])
            print(f"{shape:8} {m:5} " + " ".join(f"{cells[p]['us']:9.1f} {cells[p]['gb_per_s']:4.1f}GB" for p in paths)
                  + f"  {best}")
    if args.json:
        write_json(args.json, {"cpu": cpu_features.describe(), "rows": rows})


if __name__ == "__main__":
    main()
