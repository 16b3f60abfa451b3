"""Packed int8 panels against the formats' own blocks: one N x K matmul per GGUF format, by activation rows.

For each format and row count M: ``blocks`` is the call on the file's blocks, as the engine ran it before
packing (int8 activations; the rows path below ``set_q8_panel_min_rows`` rows, the int8 panels built per call
above), ``packed`` the call on the same rows packed at load (``quant_kernels.pack_panels``; for the K-quants
the packed tiles or, from ``set_packed_expand_min_rows`` rows, each panel expanded once). Enough copies of the
weight are cycled through that they come from DRAM, as a model's layers do (``--copies``). Paths are timed
interleaved, fastest of ``--reps``; ``GB/s`` is the packed weight's bytes over its time, the number to hold
against ``bench/bandwidth.py`` at one row. Random valid blocks: the time does not depend on the values.

    python bench/packed_matmul.py [--rows 1,4,32,128] [--format Q4_K --format Q6_K] [--n 4096 --k 2048] [--json PATH]
    python bench/packed_matmul.py --isa avx2          # the AVX2 tiles on an AVX-512 CPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.layers import quant_kernels as qk

PACKED_FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}  # where the f16 scales are


def random_blocks(fmt: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    qtype = qk.GGUF_TYPES[fmt]
    block_bytes, block_elems = qk.BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(n, k // block_elems, block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[fmt]:  # sane f16 scales: no infinities or NaNs in the sums
        halves = rng.uniform(1e-3, 1e-2, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = halves.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return torch.from_numpy(blocks.reshape(n, -1))


def timed_us(qtype: int, weights: list[torch.Tensor], x: torch.Tensor, k: int) -> float:
    start = time.perf_counter()
    for w in weights:
        qk.matmul(x, qtype, w, k, activations="q8")
    return (time.perf_counter() - start) / len(weights) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,128")
    parser.add_argument("--format", action="append", choices=PACKED_FORMATS, help=f"default: {PACKED_FORMATS}")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--copies", type=int, default=0, help="weights cycled through (default: >= 96 MB)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--isa", default=None, help="cap the kernel path (e.g. avx2 on an AVX-512 CPU)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if not qk.has_int8_panels():
        print("this CPU has no int8 tiles (AVX2 or better): nothing to compare")
        return 0
    if args.isa:
        qk.set_isa(args.isa)
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu_features.describe()}; kernel path {qk.current_isa()}; {torch.get_num_threads()} threads; "
          f"N x K = {args.n} x {args.k}", flush=True)
    header = f"{'format':>7}{'M':>6}{'blocks us':>11}{'packed us':>11}{'speed-up':>10}{'packed GB/s':>13}"
    print(header)
    print("-" * len(header))
    results = []
    for fmt in args.format or PACKED_FORMATS:
        qtype = qk.GGUF_TYPES[fmt]
        nbytes = args.n * qk.row_bytes(qtype, args.k)
        copies = args.copies or max(2, -(-96_000_000 // nbytes))
        blocks = [random_blocks(fmt, args.n, args.k, rng) for _ in range(copies)]
        packed = [qk.pack_panels(qtype, w, args.k) for w in blocks]
        for m in [int(r) for r in args.rows.split(",") if r]:
            x = torch.randn(m, args.k)
            best = {"blocks": float("inf"), "packed": float("inf")}
            for _ in range(args.reps):  # interleaved: a noisy neighbour slows both alike
                best["blocks"] = min(best["blocks"], timed_us(qtype, blocks, x, args.k))
                best["packed"] = min(best["packed"], timed_us(qtype | qk.PACKED, packed, x, args.k))
            row = {"format": fmt, "rows": m, "blocks_us": best["blocks"], "packed_us": best["packed"],
                   "speedup": best["blocks"] / best["packed"], "packed_gbps": nbytes / best["packed"] / 1e3}
            results.append(row)
            print(f"{fmt:>7}{m:>6}{row['blocks_us']:>11.0f}{row['packed_us']:>11.0f}{row['speedup']:>9.2f}x"
                  f"{row['packed_gbps']:>13.1f}", flush=True)
    if args.json_path:
        write_json(args.json_path, {"cpu": cpu_features.describe(), "n": args.n, "k": args.k, "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
