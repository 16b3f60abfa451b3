"""The quantized CPU matmul (``engine/csrc/quant_kernels.cpp``) at SmolLM2-135M's shapes, by activation rows.

For each row count M, one layer's four matmuls (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536)
through each float32 path of the kernel: ``decode`` (weights decoded in registers for every four rows),
``panel`` (each panel of 16 weight rows dequantised once, then 4-row x 4-weight-row dot-product tiles),
``wide`` (wide k-major panels and an outer-product micro-kernel) and, as the peer, ``dense``
(``torch.matmul`` on the dequantised float32 weights: oneDNN/MKL), and the engine's bf16-activation call
(``bf16``: x and y in bfloat16; vdpbf16ps panels from ``set_bf16_min_rows`` rows where the CPU has AVX-512
BF16, else x widened to float32; not part of ``best``), and the int8-activation paths (llama.cpp's
arithmetic, less exact: ``q8 rows``, 4-row dot products, and ``q8 panel``, the int8 panel GEMM on AVX-512
VNNI; ``f32/q8`` is the best float32 path's time over the best int8 one's). Paths are timed interleaved, fastest of
``--reps``; GFLOP/s is 2*M*N*K over the best path's time. ``max err`` is the largest difference of any path
from the dense result, relative to the largest output. The engine's row thresholds between the paths
(printed) come from this table.

    python bench/quant_matmul.py [--rows 1,4,8,16,32,64,256,1024] [--format Q4_1] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.layers import quant_kernels as qk

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def quantized(fmt: str, n: int, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights in ``fmt`` through the gguf package's quantizer, and their dequantised values."""
    dense = (rng.standard_normal((n, k)) / k**0.5).astype(np.float32)
    blocks = torch.from_numpy(quants.quantize(dense, GGMLQuantizationType[fmt]).reshape(n, -1).copy())
    return blocks, qk.dequantize(qk.GGUF_TYPES[fmt], blocks, k)


def quantized_layer(weights: dict, xs: dict[str, torch.Tensor], qtype: int, path: str) -> None:
    with qk.forced_path(path):
        for name, (blocks, _) in weights.items():
            qk.matmul(xs[name], qtype, blocks, SHAPES[name][1], activations="f32")


def q8_layer(weights: dict, xs: dict[str, torch.Tensor], qtype: int, path: str) -> None:
    with qk.forced_q8_path(path):
        for name, (blocks, _) in weights.items():
            qk.matmul(xs[name], qtype, blocks, SHAPES[name][1], activations="q8")


def bf16_layer(weights: dict, xs: dict[str, torch.Tensor], qtype: int) -> None:
    for name, (blocks, _) in weights.items():
        qk.matmul(xs[name], qtype, blocks, SHAPES[name][1], activations="f32")


def dense_layer(weights: dict, xs: dict[str, torch.Tensor]) -> None:
    for name, (_, w) in weights.items():
        torch.matmul(xs[name], w.T)


def timed_us(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,256,1024")
    parser.add_argument("--format", default="Q4_1", choices=sorted(qk.GGUF_TYPES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    qtype = qk.GGUF_TYPES[args.format]
    rng = np.random.default_rng(0)
    weights = {name: quantized(args.format, n, k, rng) for name, (n, k) in SHAPES.items()}
    print(f"CPU: {cpu_features.describe()}; kernel path {qk.current_isa()}; {torch.get_num_threads()} threads; "
          f"{args.format}", flush=True)
    header = (f"{'M':>6}{'decode us':>11}{'panel us':>10}{'wide us':>9}{'dense us':>10}{'best':>8}{'best/dense':>12}"
              f"{'best GF/s':>11}{'max err':>10}{'bf16 us':>9}{'best/bf16':>11}{'q8 rows':>9}{'q8 panel':>10}"
              f"{'f32/q8':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for m in [int(r) for r in args.rows.split(",") if r]:
        xs = {name: torch.randn(m, k) for name, (_, k) in SHAPES.items()}
        xs16 = {name: x.to(torch.bfloat16) for name, x in xs.items()}
        flops = sum(2 * m * n * k for n, k in SHAPES.values())

        times = {name: float("inf") for name in [*qk.F32_PATHS, "dense", "bf16", *(f"q8_{p}" for p in qk.Q8_PATHS)]}
        for _ in range(args.reps):  # interleaved: a noisy neighbour slows every path alike
            for path in qk.F32_PATHS:
                times[path] = min(times[path], timed_us(quantized_layer, weights, xs, qtype, path))
            times["dense"] = min(times["dense"], timed_us(dense_layer, weights, xs))
            times["bf16"] = min(times["bf16"], timed_us(bf16_layer, weights, xs16, qtype))
            for path in qk.Q8_PATHS:
                times[f"q8_{path}"] = min(times[f"q8_{path}"], timed_us(q8_layer, weights, xs, qtype, path))
        errs = {}
        for path in qk.F32_PATHS:
            with qk.forced_path(path):
                errs[path] = max(float((qk.matmul(xs[name], qtype, blocks, SHAPES[name][1], activations="f32")
                                        - xs[name] @ w.T).abs().max() / (xs[name] @ w.T).abs().max())
                                 for name, (blocks, w) in weights.items())
        best = min(qk.F32_PATHS, key=times.get)
        best_q8 = min(times["q8_rows"], times["q8_panel"])
        row = {"rows": m, **{f"{k}_us": v for k, v in times.items()}, "best": best,
               "best_gflops": flops / times[best] / 1e3, "max_rel_err": max(errs.values())}
        rows.append(row)
        print(f"{m:>6}{times['decode']:>11.0f}{times['panel']:>10.0f}{times['wide']:>9.0f}{times['dense']:>10.0f}"
              f"{best:>8}{times[best] / times['dense']:>12.2f}{row['best_gflops']:>11.1f}{row['max_rel_err']:>10.1e}"
              f"{times['bf16']:>9.0f}{times[best] / times['bf16']:>11.2f}{times['q8_rows']:>9.0f}"
              f"{times['q8_panel']:>10.0f}{times[best] / best_q8:>8.2f}",
              flush=True)
    panel_from = qk.set_panel_min_rows(1)  # (read back and restored: the kernels' own thresholds)
    wide_from = qk.set_wide_min_rows(1)
    qk.set_panel_min_rows(panel_from)
    qk.set_wide_min_rows(wide_from)
    bf16_from = qk.set_bf16_min_rows(1)
    qk.set_bf16_min_rows(bf16_from)
    q8_from = qk.set_q8_panel_min_rows(1)
    qk.set_q8_panel_min_rows(q8_from)
    print(f"the engine's thresholds: panel from {panel_from} rows, wide panels from {wide_from}; bf16 dot products "
          f"from {bf16_from} rows ({'on' if qk.has_bf16_dot() else 'not on'} this CPU); int8 panels from {q8_from}")
    if args.json_path:
        write_json(args.json_path, {"cpu": cpu_features.describe(), "format": args.format, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
