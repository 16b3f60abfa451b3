"""Paged attention on the CPU with the C++ kernels (the default CPU backend when they build).

Decodes and short prefill chunks, one query row per token, read K/V straight from the block tables in
one kernel call for the whole step: no gather, no padding, no mask. Long prefill chunks use the torch
backend's SDPA over their gathered context. RoPE and the KV store are one fused pass
(``rotary_and_store``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kubeinfer.engine.attention_metadata import AttentionMetadata
from kubeinfer.engine.layers import attention as torch_backend
from kubeinfer.engine.layers import cpu_kernels

store_kv_cache = torch_backend.store_kv_cache
# Decode steps on DecodeGraphs' static buffers read every per-step fact from them (``_plan``), so they can
# be recorded and replayed (``cpu_replay``).
CPU_REPLAY_SAFE = True


def rotary_and_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k, k/v into their cache slots; returns q ``[T, heads, head_dim]`` rotated."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_heads = q.shape[-1] // head_dim if q.dim() == 2 else q.shape[1]
    return cpu_kernels.rotary_and_store(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                        num_heads, num_kv_heads, head_dim)


# Prefill chunks up to this many tokens go through the decode kernel, one query row per token (each
# with its own causal length) instead of a gather + SDPA per sequence and layer. bench/model_step.py,
# SmolLM2 bf16, attention per 1-prompt prefill: 48 tokens 2.0 ms vs 4.0 (SDPA), 512 tokens 71 vs 117,
# 2048 tokens 1041 vs 1073; longer chunks keep SDPA.
KERNEL_PREFILL_MAX_TOKENS = 1024


@dataclass
class _Plan:
    """The step's split, built once and shared by every layer: query rows the kernel takes (decodes and
    short prefill chunks, one row per token) and long prefill chunks for SDPA."""

    prefills: list[tuple[int, int, int, int, torch.Tensor | None]]  # (sequence, first row, q_len, seq_len, mask)
    kernel_rows: torch.Tensor  # int64 query row of each kernel row
    kernel_tables: torch.Tensor  # int32 [kernel rows, blocks]: the row's sequence's block table
    kernel_lens: torch.Tensor  # int32 [kernel rows]: positions the row attends to (causal)
    built_from: tuple[list[int], list[int], torch.Tensor] | None  # in case a caller refills the same metadata

    def matches(self, md: AttentionMetadata) -> bool:
        seq_lens, query_lens, tables = self.built_from
        return seq_lens == md.seq_lens_cpu and query_lens == md.query_lens_cpu and torch.equal(tables, md.block_tables)


def _plan(md: AttentionMetadata) -> _Plan:
    plan = getattr(md, "_cpu_attention_plan", None)
    if plan is not None and (plan.built_from is None or plan.matches(md)):
        return plan
    if _reads_static_buffers(md):
        # A decode step on DecodeGraphs' static buffers (seq_lens_cpu holds the longest context there, not
        # the real lengths): the kernel reads the lengths and tables from those buffers at every replay.
        plan = _Plan([], torch.arange(md.num_seqs), md.block_tables, md.seq_lens, None)
        md._cpu_attention_plan = plan
        return plan
    prefills, rows, sequences, lens, start = [], [], [], [], 0
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu, strict=True)):
        if 1 <= q_len <= KERNEL_PREFILL_MAX_TOKENS:
            rows.extend(range(start, start + q_len))
            sequences.extend([i] * q_len)
            lens.extend(range(seq_len - q_len + 1, seq_len + 1))
        elif q_len > KERNEL_PREFILL_MAX_TOKENS:
            prefills.append((i, start, q_len, seq_len, torch_backend._chunk_mask(q_len, seq_len, md.seq_lens.device)))
        start += q_len
    tables = md.block_tables
    if sequences != list(range(md.num_seqs)):
        tables = tables.index_select(0, torch.tensor(sequences, dtype=torch.int64))
    plan = _Plan(prefills, torch.tensor(rows, dtype=torch.int64), tables.to(torch.int32).contiguous(),
                 torch.tensor(lens, dtype=torch.int32),
                 (list(md.seq_lens_cpu), list(md.query_lens_cpu), md.block_tables.clone()))
    md._cpu_attention_plan = plan  # every layer of the step reuses it
    return plan


def _reads_static_buffers(md: AttentionMetadata) -> bool:
    return (md.static_buffers and md.max_query_len == 1 and md.seq_lens.dtype == torch.int32
            and md.block_tables.dtype == torch.int32 and md.block_tables.stride(1) == 1)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    attn_metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of the flat batch's queries ``[T, heads, head_dim]`` over each sequence's cached context."""
    plan = _plan(attn_metadata)
    query = query.contiguous()
    out = torch.empty_like(query)
    for i, start, q_len, seq_len, mask in plan.prefills:
        out[start:start + q_len] = torch_backend._prefill_attention(
            query[start:start + q_len], k_cache, v_cache, attn_metadata.block_tables[i], seq_len, mask, scale)
    if plan.kernel_rows.numel():
        cpu_kernels.paged_decode_attention(query, out, plan.kernel_rows, k_cache, v_cache, plan.kernel_tables,
                                           plan.kernel_lens, scale)
    return out
