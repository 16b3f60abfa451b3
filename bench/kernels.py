"""GPU microbenchmark of the Triton kernels (needs a CUDA GPU).

Attention decode: batch 1/32/128 x context 512/2048/8192, one new token per sequence, every
sequence at the full context, block tables shuffled (a fragmented cache). Prefill: 2048-token
prompts. Mixed: one prefill chunk plus many decodes in a single launch (continuous batching).
Also the KV-cache write and the fused RMSNorm(+residual) and SiLU-and-mul kernels (for those
the ``ctx`` column is the hidden/intermediate width and the baseline is torch eager).

Each row: time per call (median of ``triton.testing.do_bench``), effective memory bandwidth
(bytes the kernel must move / time) against the device's peak, TFLOP/s for prefill, the torch
baseline (attention: ``F.scaled_dot_product_attention`` over a contiguous, unpaged copy of the
same cache) and the largest difference between the two outputs.

    python bench/kernels.py                       # Llama-3-8B attention shape, bf16
    python bench/kernels.py --heads 9 --kv-heads 3 --head-dim 64     # SmolLM2-135M
    python bench/kernels.py --json results.json   # also write the rows as JSON ('-' = stdout)
    python bench/kernels.py --sweep               # also time other launch configs (retuning aid)
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from kubeinfer.engine.bench.report import write_json

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Row:
    case: str
    batch: int
    query_len: int
    context: int
    triton_us: float
    torch_us: float | None
    speedup: float | None  # torch baseline time / triton time
    triton_gbps: float
    peak_pct: float | None
    torch_gbps: float | None
    triton_tflops: float | None
    num_splits: int | None
    max_abs_diff: float | None


def peak_bandwidth_gbps(device: int) -> float | None:
    """HBM peak from the device's memory clock (kHz, double data rate) and bus width (bits)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def time_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


class PagedBatch:
    """A paged KV cache holding each sequence's full context, plus the flat-batch metadata."""

    def __init__(self, query_lens, seq_lens, *, heads, kv_heads, head_dim, block_size, dtype, seed=0):
        from kubeinfer.engine.attention_metadata import AttentionMetadata

        gen = torch.Generator(device="cuda").manual_seed(seed)
        blocks_per_seq = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + 1
        ids = list(range(1, num_blocks))
        random.Random(seed).shuffle(ids)
        table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
        taken = 0
        self.tables = []
        for i, n in enumerate(blocks_per_seq):
            self.tables.append(ids[taken : taken + n])
            table[i, :n] = torch.tensor(ids[taken : taken + n], dtype=torch.int32)
            taken += n
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        self.v_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        num_tokens = sum(query_lens)
        self.query = torch.randn(num_tokens, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
        self.key = torch.randn(num_tokens, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
        self.value = torch.randn_like(self.key)
        slots = [
            t[pos // block_size] * block_size + pos % block_size
            for t, q, s in zip(self.tables, query_lens, seq_lens, strict=True)
            for pos in range(s - q, s)
        ]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        self.metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
            block_tables=table.cuda(),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )
        self.kv_bytes = sum(seq_lens) * kv_heads * head_dim * 2 * self.k_cache.element_size()
        self.qo_bytes = 2 * self.query.numel() * self.query.element_size()

    def contiguous_kv(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's first ``length`` cached tokens, unpaged: ``[B, kv_heads, length, head_dim]``."""
        table = self.metadata.block_tables.long()

        def gather(cache: torch.Tensor) -> torch.Tensor:
            tokens = cache[table].flatten(1, 2)[:, :length]  # [B, blocks * block_size, kv_heads, d]
            return tokens.transpose(1, 2).contiguous()

        return gather(self.k_cache), gather(self.v_cache)


def bench_decode(batch, context, args, peak) -> Row:
    from kubeinfer.engine.layers import triton_attention as ta

    pb = PagedBatch([1] * batch, [context] * batch, **model_kwargs(args))
    scale = args.head_dim**-0.5
    k, v = pb.contiguous_kv(context)  # SDPA baseline: the same data, stored contiguously
    q = pb.query.unsqueeze(2)  # [B, heads, 1, d]

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def paged():
        return ta.paged_attention(pb.query, pb.k_cache, pb.v_cache, pb.metadata, scale)

    diff = (paged().float() - sdpa().squeeze(2).float()).abs().max().item()
    t_triton, t_torch = time_us(paged), time_us(sdpa)
    config = ta._launch_config(pb.query, args.kv_heads, pb.metadata)
    return make_row(
        "decode", batch, 1, context, pb.kv_bytes + pb.qo_bytes, None, t_triton, t_torch, peak, config, diff
    )


def bench_prefill(batch, length, args, peak) -> Row:
    from kubeinfer.engine.layers import triton_attention as ta

    pb = PagedBatch([length] * batch, [length] * batch, **model_kwargs(args))
    scale = args.head_dim**-0.5
    ta.store_kv_cache(pb.key, pb.value, pb.k_cache, pb.v_cache, pb.metadata.slot_mapping)
    q = pb.query.view(batch, length, args.heads, args.head_dim).transpose(1, 2)
    k = pb.key.view(batch, length, args.kv_heads, args.head_dim).transpose(1, 2)
    v = pb.value.view(batch, length, args.kv_heads, args.head_dim).transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    def paged():
        return ta.paged_attention(pb.query, pb.k_cache, pb.v_cache, pb.metadata, scale)

    expected = sdpa().transpose(1, 2).reshape(batch * length, args.heads, args.head_dim)
    diff = (paged().float() - expected.float()).abs().max().item()
    flops = 4 * batch * args.heads * args.head_dim * length * (length + 1) / 2  # QK^T and PV, causal half
    t_triton, t_torch = time_us(paged), time_us(sdpa)
    config = ta._launch_config(pb.query, args.kv_heads, pb.metadata)
    return make_row(
        "prefill",
        batch,
        length,
        length,
        pb.kv_bytes + pb.qo_bytes,
        flops,
        t_triton,
        t_torch,
        peak,
        config,
        diff,
    )


def bench_mixed(num_decodes, context, chunk, args, peak) -> Row:
    """One prefill chunk of ``chunk`` tokens over a ``context``-token prefix plus decodes, one launch."""
    from kubeinfer.engine.layers import triton_attention as ta

    pb = PagedBatch([chunk] + [1] * num_decodes, [context] * (num_decodes + 1), **model_kwargs(args))
    scale = args.head_dim**-0.5

    def paged():
        return ta.paged_attention(pb.query, pb.k_cache, pb.v_cache, pb.metadata, scale)

    t_triton = time_us(paged)
    config = ta._launch_config(pb.query, args.kv_heads, pb.metadata)
    return make_row(
        f"mixed(+{chunk} chunk)",
        num_decodes + 1,
        chunk,
        context,
        pb.kv_bytes + pb.qo_bytes,
        None,
        t_triton,
        None,
        peak,
        config,
        None,
    )


def bench_store(num_tokens, args, peak) -> Row:
    from kubeinfer.engine.layers import triton_attention as ta

    pb = PagedBatch([1] * num_tokens, [1] * num_tokens, **model_kwargs(args))

    def store():
        ta.store_kv_cache(pb.key, pb.value, pb.k_cache, pb.v_cache, pb.metadata.slot_mapping)

    t = time_us(store)
    moved = 2 * 2 * pb.key.numel() * pb.key.element_size()  # read K/V, write K/V
    return make_row("store_kv_cache", num_tokens, 1, 1, moved, None, t, None, peak, None, None)


def bench_rms_norm(num_tokens, hidden, args, peak) -> Row:
    """Fused residual add + RMSNorm vs the same arithmetic in torch eager (ops.rms_norm_reference)."""
    from kubeinfer.engine.layers.ops import rms_norm_reference
    from kubeinfer.engine.layers.triton_norm import rms_norm

    dtype = DTYPES[args.dtype]
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.ones(hidden, device="cuda", dtype=dtype)
    with torch.no_grad():
        diff = (
            (rms_norm(x, weight, 1e-5, residual)[0].float() - rms_norm_reference(x, weight, 1e-5, residual)[0].float())
            .abs()
            .max()
            .item()
        )
        t_triton = time_us(lambda: rms_norm(x, weight, 1e-5, residual))
        t_torch = time_us(lambda: rms_norm_reference(x, weight, 1e-5, residual))
    moved = 4 * x.numel() * x.element_size()  # read x and residual, write out and the sum
    return make_row(
        "rms_norm+residual", num_tokens, 1, hidden, moved, None, t_triton, t_torch, peak, None, diff
    )


def bench_silu_and_mul(num_tokens, intermediate, args, peak) -> Row:
    from kubeinfer.engine.layers.triton_activation import silu_and_mul

    x = torch.randn(num_tokens, 2 * intermediate, device="cuda", dtype=DTYPES[args.dtype])

    def eager():
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    diff = (silu_and_mul(x).float() - eager().float()).abs().max().item()
    t_triton, t_torch = time_us(lambda: silu_and_mul(x)), time_us(eager)
    moved = 3 * num_tokens * intermediate * x.element_size()  # read gate and up, write out
    return make_row(
        "silu_and_mul", num_tokens, 1, intermediate, moved, None, t_triton, t_torch, peak, None, diff
    )


def sweep_attention(args) -> list[dict]:
    """Time a small grid of launch configs on representative shapes, to retune ``_launch_config``."""
    results = []
    for kind, batch, context in [
        ("decode", 1, 8192),
        ("decode", 32, 2048),
        ("decode", 128, 2048),
        ("prefill", 1, 2048),
    ]:
        results.append(sweep_case(kind, batch, context, args))
        torch.cuda.empty_cache()
        r = results[-1]
        print(f"{r['case']}: default {r['default_us']} us {r['default']}; best {r['best_us']} us {r['best']}")
    return results


def sweep_case(kind: str, batch: int, context: int, args) -> dict:
    import itertools

    from kubeinfer.engine.layers import triton_attention as ta

    q_len = context if kind == "prefill" else 1
    pb = PagedBatch([q_len] * batch, [context] * batch, **model_kwargs(args))
    scale = args.head_dim**-0.5
    qpk = args.heads // args.kv_heads
    min_m = max(16, 1 << (qpk - 1).bit_length())
    default = ta._launch_config(pb.query, args.kv_heads, pb.metadata)
    if kind == "prefill":
        grid = itertools.product([64, 128], [32, 64, 128], [1], [4, 8], [2, 3])
    else:
        splits = sorted({max(1, default.num_splits // 2), default.num_splits, default.num_splits * 2})
        grid = itertools.product([min_m], [32, 64, 128], splits, [2, 4], [2, 3, 4])

    def run(config):
        return ta.paged_attention_with_config(pb.query, pb.k_cache, pb.v_cache, pb.metadata, scale, config)

    timed = []
    for block_m, tile_n, num_splits, num_warps, num_stages in grid:
        config = ta.LaunchConfig(max(block_m, min_m), tile_n, num_splits, num_warps, num_stages)
        try:
            timed.append((time_us(lambda c=config: run(c)), config))
        except Exception as exc:  # out of shared memory / registers: not a candidate
            print(f"  skip {config}: {type(exc).__name__}", file=sys.stderr)
    timed.sort(key=lambda tc: tc[0])
    return {
        "case": f"{kind} b={batch} ctx={context}",
        "default_us": round(time_us(lambda: run(default)), 2),
        "default": asdict(default),
        "best_us": round(timed[0][0], 2),
        "best": asdict(timed[0][1]),
        "top3": [(round(t, 2), asdict(c)) for t, c in timed[:3]],
    }


def make_row(case, batch, query_len, context, moved, flops, t_triton, t_torch, peak, config, diff) -> Row:
    gbps = moved / (t_triton * 1e-6) / 1e9
    return Row(
        case=case,
        batch=batch,
        query_len=query_len,
        context=context,
        triton_us=round(t_triton, 2),
        torch_us=None if t_torch is None else round(t_torch, 2),
        speedup=None if t_torch is None else round(t_torch / t_triton, 2),
        triton_gbps=round(gbps, 1),
        peak_pct=None if peak is None else round(100 * gbps / peak, 1),
        torch_gbps=None if t_torch is None else round(moved / (t_torch * 1e-6) / 1e9, 1),
        triton_tflops=None if flops is None else round(flops / (t_triton * 1e-6) / 1e12, 1),
        num_splits=None if config is None else config.num_splits,
        max_abs_diff=None if diff is None else float(f"{diff:.3g}"),
    )


def model_kwargs(args) -> dict:
    return dict(
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        dtype=DTYPES[args.dtype],
    )


def print_table(rows: list[Row]) -> None:
    headers = [
        ("case", "case"),
        ("batch", "batch"),
        ("q_len", "query_len"),
        ("ctx", "context"),
        ("triton us", "triton_us"),
        ("torch us", "torch_us"),
        ("speedup", "speedup"),
        ("GB/s", "triton_gbps"),
        ("% peak", "peak_pct"),
        ("torch GB/s", "torch_gbps"),
        ("TFLOP/s", "triton_tflops"),
        ("splits", "num_splits"),
        ("max|diff|", "max_abs_diff"),
    ]
    cells = [[("-" if getattr(r, key) is None else str(getattr(r, key))) for _, key in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(headers)]
    print("  ".join(h.rjust(w) for (h, _), w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--prefill", type=int, nargs="+", default=[2048], help="prompt lengths (batch 1)")
    parser.add_argument("--intermediate", type=int, help="MLP width for silu_and_mul (default 3.5 x hidden)")
    parser.add_argument(
        "--sweep", action="store_true", help="also time a grid of attention launch configs (for retuning)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH ('-' = stdout)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "bench/kernels.py needs a CUDA GPU: the Triton kernels only compile for GPUs "
            "(their CPU correctness tests run in the Triton interpreter: pytest tests/engine/test_triton_attention.py).",
            file=sys.stderr,
        )
        return 2
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")

    device = torch.cuda.current_device()
    peak = peak_bandwidth_gbps(device)
    name = torch.cuda.get_device_name(device)
    print(
        f"device: {name}, peak HBM {peak and round(peak)} GB/s; attention {args.heads} heads / {args.kv_heads} KV heads "
        f"x {args.head_dim}, {args.dtype}, block_size {args.block_size}"
    )
    rows: list[Row] = []
    for batch in args.batches:
        for context in args.contexts:
            rows.append(bench_decode(batch, context, args, peak))
            torch.cuda.empty_cache()
    for length in args.prefill:
        rows.append(bench_prefill(1, length, args, peak))
    rows.append(bench_mixed(63, 2048, 512, args, peak))
    for num_tokens in (128, 2048):
        rows.append(bench_store(num_tokens, args, peak))
    hidden = args.heads * args.head_dim
    for num_tokens in (128, 2048):
        rows.append(bench_rms_norm(num_tokens, hidden, args, peak))
        rows.append(bench_silu_and_mul(num_tokens, args.intermediate or round(3.5 * hidden), args, peak))
    print_table(rows)
    sweep = sweep_attention(args) if args.sweep else None

    if args.json:
        payload = {
            "device": name,
            "peak_gbps": peak,
            "torch": torch.__version__,
            "shape": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": [asdict(r) for r in rows],
            "sweep": sweep,
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
