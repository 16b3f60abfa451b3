"""Paged attention on the CPU with the C++ kernels (the default CPU backend when they build).

Decodes, one query each, read K/V straight from the block tables in one kernel call for the whole
step: no gather, no padding, no mask. Prefill chunks (a few per step) use the torch backend's SDPA
over their gathered context. RoPE and the KV store are one fused pass (``rotary_and_store``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kubeinfer.engine.attention_metadata import AttentionMetadata
from kubeinfer.engine.layers import attention as torch_backend
from kubeinfer.engine.layers import cpu_kernels

store_kv_cache = torch_backend.store_kv_cache


def rotary_and_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k, k/v into their cache slots; returns q ``[T, heads, head_dim]`` rotated."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_heads = q.shape[-1] // head_dim if q.dim() == 2 else q.shape[1]
    return cpu_kernels.rotary_and_store(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                        num_heads, num_kv_heads, head_dim)


@dataclass
class _Plan:
    """The step's split into prefill chunks and decodes, built once and shared by every layer."""

    prefills: list[tuple[int, int, int, int, torch.Tensor | None]]  # (sequence, first row, q_len, seq_len, mask)
    decode_rows: torch.Tensor  # int64 query row of each decode
    decode_tables: torch.Tensor  # int32 [decodes, blocks]
    decode_lens: torch.Tensor  # int32 [decodes]
    built_from: tuple[list[int], list[int], torch.Tensor]  # in case a caller refills the same metadata

    def matches(self, md: AttentionMetadata) -> bool:
        seq_lens, query_lens, tables = self.built_from
        return seq_lens == md.seq_lens_cpu and query_lens == md.query_lens_cpu and torch.equal(tables, md.block_tables)


def _plan(md: AttentionMetadata) -> _Plan:
    plan = getattr(md, "_cpu_attention_plan", None)
    if plan is not None and plan.matches(md):
        return plan
    prefills, decodes, rows, start = [], [], [], 0
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu, strict=True)):
        if q_len == 1:
            decodes.append(i)
            rows.append(start)
        elif q_len > 1:
            prefills.append((i, start, q_len, seq_len, torch_backend._chunk_mask(q_len, seq_len, md.seq_lens.device)))
        start += q_len
    tables, lens = md.block_tables, md.seq_lens
    if len(decodes) != md.num_seqs:
        index = torch.tensor(decodes, dtype=torch.int64)
        tables, lens = tables.index_select(0, index), lens.index_select(0, index)
    plan = _Plan(prefills, torch.tensor(rows, dtype=torch.int64), tables.to(torch.int32).contiguous(),
                 lens.to(torch.int32).contiguous(),
                 (list(md.seq_lens_cpu), list(md.query_lens_cpu), md.block_tables.clone()))
    md._cpu_attention_plan = plan  # every layer of the step reuses it
    return plan


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    attn_metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of the flat batch's queries ``[T, heads, head_dim]`` over each sequence's cached context."""
    plan = _plan(attn_metadata)
    query = query.contiguous()
    out = torch.empty_like(query)
    for i, start, q_len, seq_len, mask in plan.prefills:
        out[start:start + q_len] = torch_backend._prefill_attention(
            query[start:start + q_len], k_cache, v_cache, attn_metadata.block_tables[i], seq_len, mask, scale)
    if plan.decode_rows.numel():
        cpu_kernels.paged_decode_attention(query, out, plan.decode_rows, k_cache, v_cache, plan.decode_tables,
                                           plan.decode_lens, scale)
    return out
