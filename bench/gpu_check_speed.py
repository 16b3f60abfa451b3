"""The GPU check's benchmark: decode steps (forward + logits) at batch 1 and 64, eager and CUDA graphs.

Models at their real shapes with random weights (speed does not depend on the values): Llama-3.1-8B and
SmolLM2-135M (the bundled weights when installed). Each step copies its batch from the host like the model
runner does, so graph replays pay their buffer copies. The floor is the bytes a step must read (weights +
the batch's KV) over the device-to-device copy rate measured here (bytes read + written per second).
``--dry-run`` runs the same code on the CPU with a tiny model at batch 1 and 4 (the Triton kernels
interpreted, the graphs emulated): its times mean nothing.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from kubeinfer.engine.cuda_graphs import DecodeGraphs
from kubeinfer.engine.layers.quantization import weight_report
from kubeinfer.engine.model_runner import HostBatch
from kubeinfer.engine.models.config import ModelConfig
from kubeinfer.engine.models.loader import build_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5),
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5),
}
ENGINE_MAX_MODEL_LEN = 32768  # the engine's GPU default cap: graphs are captured for it
BLOCK_SIZE = 16


@dataclass
class SpeedRow:
    model: str
    weights: str
    dtype: str
    batch: int
    context: int  # longest context of the batch (contexts drawn from [context / 2, context])
    mode: str  # eager | cuda-graphs | cuda-graphs (emulated)
    min_ms: float
    median_ms: float
    tokens_per_s: float
    floor_ms: float | None  # bytes read per step / measured copy rate


def model_config(name: str, dtype: torch.dtype) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", bos_token_id=1, eos_token_ids=[2], dtype=dtype,
                       **SHAPES[name])


def random_model(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg, device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model


def copy_rate(device: torch.device) -> float | None:
    """Bytes per second a device-to-device copy of 2 GiB moves (read + written), best of 5."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / best


def decode_batch(seq_lens: list[int], tables: list[list[int]], vocab: int, rng: random.Random) -> HostBatch:
    width = max(len(t) for t in tables)
    block_tables = np.zeros((len(seq_lens), width), dtype=np.int32)
    for row, table in enumerate(tables):
        block_tables[row, :len(table)] = table
    positions = np.asarray([s - 1 for s in seq_lens], dtype=np.int64)
    slots = np.asarray([t[(s - 1) // BLOCK_SIZE] * BLOCK_SIZE + (s - 1) % BLOCK_SIZE
                        for t, s in zip(tables, seq_lens, strict=True)], dtype=np.int64)
    ids = np.asarray([rng.randrange(vocab) for _ in seq_lens], dtype=np.int64)
    return HostBatch(ids, positions, slots, block_tables, [1] * len(seq_lens), list(seq_lens), BLOCK_SIZE)


def bench_model(name: str, dtype: torch.dtype, device: torch.device, batches: list[int], context: int,
                steps: int, modes: list[str], use_bundled: bool, rate: float | None, warmup: int = 3
                ) -> list[SpeedRow]:
    cfg = model_config(name, dtype)
    weights = "random"
    if use_bundled:
        from kubeinfer.engine.models.loader import load_model

        loaded = load_model(None, dtype=dtype, device=device)
        model, cfg, weights = loaded.model, loaded.config, f"bundled GGUF ({loaded.quantization})"
    else:
        model = random_model(cfg, device)
    rng = random.Random(0)
    max_batch = max(batches)
    seq_lens_of = {b: [rng.randint(max(1, context // 2), context) for _ in range(b)] for b in batches}
    blocks_needed = max(sum(-(-s // BLOCK_SIZE) for s in lens) for lens in seq_lens_of.values())
    shape = (blocks_needed + 1, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
          for _ in range(cfg.num_layers)]
    max_model_len = min(cfg.max_position_embeddings, ENGINE_MAX_MODEL_LEN)
    graphs = None
    if any(m.startswith("cuda-graphs") for m in modes):
        graphs = DecodeGraphs(lambda ids, pos, md: model(ids, pos, md, kv), device=device, max_batch_size=max_batch,
                              max_blocks_per_seq=-(-max_model_len // BLOCK_SIZE), block_size=BLOCK_SIZE,
                              max_seq_len=max_model_len, emulate=device.type != "cuda")
        graphs.capture()
    weight_bytes = weight_report(model).total_bytes  # (quantized weights are no parameters)
    rows = []
    for batch in batches:
        seq_lens = seq_lens_of[batch]
        free = list(range(1, blocks_needed + 1))
        rng.shuffle(free)
        tables = [[free.pop() for _ in range(-(-s // BLOCK_SIZE))] for s in seq_lens]
        kv_bytes = 2 * cfg.num_layers * sum(seq_lens) * cfg.num_kv_heads * cfg.head_dim * kv[0][0].element_size()
        floor = (weight_bytes + kv_bytes) / rate * 1e3 if rate else None
        for mode in modes:
            times = []
            for i in range(steps + warmup):
                host = decode_batch(seq_lens, tables, cfg.vocab_size, rng)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    if mode == "eager":
                        ids, positions, md = host.to_device(device)
                        hidden = model(ids, positions, md, kv)
                    else:
                        assert graphs is not None and graphs.can_run(host)
                        hidden = graphs.run(host)
                    model.compute_logits(hidden)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:  # warm-up steps are not counted
                    times.append(time.perf_counter() - start)
            best, median = min(times), sorted(times)[len(times) // 2]
            rows.append(SpeedRow(name, weights, str(dtype).removeprefix("torch."), batch, context, mode,
                                 best * 1e3, median * 1e3, batch / best, floor))
    return rows


def run(dry_run: bool) -> dict[str, Any]:
    """The stage's result: rows and the copy rate; ``ok`` when every configuration ran."""
    from kubeinfer.engine.models.bundled import BundledModelMissing, bundled_model_path

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16  # the interpreter's bf16 dots are garbage
    if dry_run:
        plan = [("tiny", False)]
        batches, context, steps, warmup = [1, 4], 32, 1, 1
        modes = ["eager", "cuda-graphs (emulated)"]
    else:
        try:
            bundled_model_path()
            have_bundled = True
        except BundledModelMissing:
            have_bundled = False
        plan = [("Llama-3.1-8B", False), ("SmolLM2-135M", have_bundled)]
        batches, context, steps, warmup = [1, 64], 1024, 30, 3
        modes = ["eager", "cuda-graphs"]
    rate = copy_rate(device)
    rows: list[SpeedRow] = []
    for name, bundled in plan:
        rows += bench_model(name, dtype, device, batches, context, steps, modes, bundled, rate, warmup)
        gc.collect()  # the model, its KV cache and graphs are garbage now
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"ok": True, "rows": [asdict(r) for r in rows], "copy_bytes_per_s": rate,
            "note": "dry run: tiny model on the CPU, interpreted Triton, emulated graphs; times mean nothing"
            if dry_run else "random weights unless noted; floor = (weights + KV read) / copy rate"}
