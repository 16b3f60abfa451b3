"""CPU benchmark of one model forward (bundled SmolLM2 by default) through the paged attention backend.

Decode steps: ``batch`` sequences, one new token each, contexts drawn uniformly from
[context/4, context] (a continuous-batching mix), block tables shuffled. Prefill: one prompt.
Each row: the fastest and the median of ``--steps`` timed steps (the minimum is the honest number on
a shared machine), the part spent in attention (RoPE + KV store + paged attention) and tokens/s at the
minimum. ``--kernels torch`` measures the plain-torch ops and attention backend instead of the C++ kernels.

Decode steps are timed as the engine runs them: on the CPU the recorded step replayed (``cpu_replay``, what
``DecodeGraphs.run`` does for batches up to ``MAX_CPU_REPLAY_BATCH_SIZE``) plus the LM head, so the number is
comparable with a served token; a forward that cannot be recorded (a dense checkpoint, ``--kernels torch``,
larger batches) or ``--eager`` runs the eager forward, and the ``step`` column says which ran. A replay has no
Python between its kernels, so its attention share is not measured (``-``).

    python bench/model_step.py                              # fp32 and bf16, batch 1/8/32
    python bench/model_step.py --dtype bfloat16 --batch 32 --context 512
    python bench/model_step.py --kernels torch              # the plain-torch reference path
    python bench/model_step.py --eager                      # the eager forward for decode as well
    python bench/model_step.py --kv-cache-dtype bfloat16    # the KV cache in bf16 (float32 activations)
    python bench/model_step.py --json results.json          # also write the rows as JSON ('-' = stdout)
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from kubeinfer.engine import cpu_features, cpu_replay
from kubeinfer.engine.attention_metadata import AttentionMetadata
from kubeinfer.engine.bench.offline import TimedBackend
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.config import KV_CACHE_DTYPES
from kubeinfer.engine.cuda_graphs import MAX_CPU_REPLAY_BATCH_SIZE, DecodeGraphs
from kubeinfer.engine.layers import attention, ops
from kubeinfer.engine.model_runner import HostBatch, kv_cache_torch_dtype


@dataclass
class Row:
    dtype: str
    kv_cache_dtype: str
    phase: str
    step: str  # replay (the recorded decode step) or eager
    batch: int
    context: int
    min_ms: float
    median_ms: float
    attention_ms: float | None  # None for a replay (nothing runs in Python between its kernels)
    tokens_per_s: float


def _metadata(q_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int, seed: int
              ) -> AttentionMetadata:
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables, slots = [], []
    for q_len, seq_len in zip(q_lens, seq_lens, strict=True):
        blocks = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    width = max(map(len, tables))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()],
                                                                       dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=block_size, query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens)


def _host_batch(md: AttentionMetadata, ids: torch.Tensor, positions: torch.Tensor) -> HostBatch:
    return HostBatch(input_ids=ids.numpy(), positions=positions.numpy(), slot_mapping=md.slot_mapping.numpy(),
                     block_tables=md.block_tables.numpy().astype(np.int32), query_lens=md.query_lens_cpu,
                     seq_lens=md.seq_lens_cpu, block_size=md.block_size)


def _recorded(model, kv, batch: int, md: AttentionMetadata, context: int) -> DecodeGraphs | None:
    """The decode step recorded as the engine records it (None, with the reason printed, when it cannot be)."""
    if batch > MAX_CPU_REPLAY_BATCH_SIZE:
        return None
    graphs = DecodeGraphs(lambda ids, pos, meta: model(ids, pos, meta, kv), device=torch.device("cpu"),
                          max_batch_size=batch, max_blocks_per_seq=md.block_tables.shape[1],
                          block_size=md.block_size, max_seq_len=context)
    try:
        graphs.capture()
    except cpu_replay.ReplayUnsupported as why:
        print(f"decode batch {batch} runs eagerly: {why}")
        return None
    return graphs


def bench(loaded, phase: str, batch: int, context: int, steps: int, block_size: int = 16, eager: bool = False,
          kv_cache_dtype: str = "auto") -> Row:
    model, cfg = loaded.model, loaded.config
    cache_dtype = kv_cache_torch_dtype(kv_cache_dtype, cfg.dtype)
    rng = random.Random(0)
    if phase == "decode":
        seq_lens = [rng.randint(max(1, context // 4), context) for _ in range(batch)]
        q_lens = [1] * batch
    else:
        seq_lens, q_lens = [context] * batch, [context] * batch
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 1
    shape = (num_blocks, block_size, model.num_kv_heads_per_rank, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)) for _ in range(cfg.num_layers)]
    positions = torch.tensor([p for q, s in zip(q_lens, seq_lens, strict=True) for p in range(s - q, s)])
    ids = torch.randint(0, cfg.vocab_size, (len(positions),))
    last = torch.tensor(q_lens).cumsum(0) - 1
    totals: dict[str, float] = {"attention": 0.0}
    backend = attention.select_backend(torch.device("cpu"))
    times, attn = [], []
    with torch.inference_mode():
        graphs = None
        if phase == "decode" and not eager:
            graphs = _recorded(model, kv, batch, _metadata(q_lens, seq_lens, block_size, num_blocks, 0), context)
        for i in range(steps + 2):
            md = _metadata(q_lens, seq_lens, block_size, num_blocks, seed=i)
            for layer in model.model.layers:
                layer.self_attn.attn._backend = TimedBackend(backend, totals)
            totals["attention"] = 0.0
            if graphs is not None:
                host = _host_batch(md, ids, positions)
                start = time.perf_counter()
                model.compute_logits(graphs.run(host))
            else:
                start = time.perf_counter()
                model.compute_logits(model(ids, positions, md, kv).index_select(0, last))
            if i >= 2:  # warm-up steps are not counted
                times.append(time.perf_counter() - start)
                attn.append(totals["attention"])
    best = min(range(len(times)), key=times.__getitem__)
    tokens = batch if phase == "decode" else batch * context
    return Row(str(cfg.dtype).removeprefix("torch."), str(cache_dtype).removeprefix("torch."), phase, "eager" if graphs is None else "replay", batch, context,
               times[best] * 1e3, sorted(times)[len(times) // 2] * 1e3, None if graphs else attn[best] * 1e3,
               tokens / times[best])


def main(argv: list[str] | None = None) -> None:
    from kubeinfer.engine.models.loader import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", action="append", help="float32 / bfloat16 (repeatable; default both)")
    parser.add_argument("--batch", type=int, action="append", help="decode batch sizes (default 1, 8, 32)")
    parser.add_argument("--context", type=int, default=512, help="longest decode context (default 512)")
    parser.add_argument("--prefill", type=int, default=512, help="prefill prompt length (0 = skip)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--kernels", choices=["auto", "torch"], default="auto",
                        help="auto: the C++ CPU kernels when they build; torch: plain torch ops and attention")
    parser.add_argument("--eager", action="store_true", help="time the eager forward for decode (default: the replay)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="the KV cache's dtype, as `kubeinfer serve --kv-cache-dtype` (auto: the model's)")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this path ('-' = stdout)")
    args = parser.parse_args(argv)
    if args.kernels == "torch":
        os.environ[ops.KERNELS_ENV] = os.environ[attention.BACKEND_ENV] = "torch"
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtype or ["float32", "bfloat16"]:
        loaded = load_model(args.model, dtype=dtype)
        for batch in args.batch or [1, 8, 32]:
            rows.append(bench(loaded, "decode", batch, args.context, args.steps, eager=args.eager,
                              kv_cache_dtype=args.kv_cache_dtype))
        if args.prefill:
            rows.append(bench(loaded, "prefill", 1, args.prefill, max(3, args.steps // 3),
                              kv_cache_dtype=args.kv_cache_dtype))
    print(f"CPU: {cpu_features.describe()}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}")
    print(f"kernels={args.kernels}  threads={torch.get_num_threads()}  model={args.model or 'bundled SmolLM2-135M-Instruct'}")
    print(f"{'dtype':9} {'kv cache':9} {'phase':8} {'step':6} {'batch':>5} {'ctx':>5} {'min ms':>8} {'median':>8} {'attn ms':>8} "
          f"{'tok/s':>8}")
    for r in rows:
        attn_ms = "-" if r.attention_ms is None else f"{r.attention_ms:.1f}"
        print(f"{r.dtype:9} {r.kv_cache_dtype:9} {r.phase:8} {r.step:6} {r.batch:5} {r.context:5} {r.min_ms:8.2f} {r.median_ms:8.2f} "
              f"{attn_ms:>8} {r.tokens_per_s:8.0f}")
    if args.json:
        write_json(args.json, [asdict(r) for r in rows])


if __name__ == "__main__":
    main()
