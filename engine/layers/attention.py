"""Paged attention: the Attention layer and the pure-torch backend.

A backend is two functions with one signature (see ``store_kv_cache`` and ``paged_attention``
below), plus optionally ``rotary_and_store`` (RoPE fused with the KV store). This torch backend
runs anywhere and is the reference for the Triton kernels (``triton_attention.py``) and the C++ CPU
kernels (``cpu_attention.py``). The layer picks ``triton`` on CUDA and ``cpu`` on the CPU when they
load, else ``torch``; ``KUBEINFER_ATTENTION_BACKEND=torch|triton|cpu`` overrides.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from kubeinfer.engine.attention_metadata import AttentionMetadata
from torch import nn

BACKEND_ENV = "KUBEINFER_ATTENTION_BACKEND"
_BACKEND_MODULES = {"torch": __name__, "triton": "kubeinfer.engine.layers.triton_attention",
                    "cpu": "kubeinfer.engine.layers.cpu_attention"}


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V ``[T, kv_heads, head_dim]`` at its slot; slots < 0 are skipped."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


_workspaces: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def _gather_blocks(name: str, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``cache[blocks]`` written into a reused buffer: fresh multi-MB tensors every layer cost more in
    page faults than the copy itself on the CPU."""
    numel = blocks.numel() * cache[0].numel()
    key = (name, cache.dtype, cache.device)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buf = _workspaces[key] = torch.empty(numel, dtype=cache.dtype, device=cache.device)
    out = buf[:numel].view(blocks.numel(), *cache.shape[1:])
    return torch.index_select(cache, 0, blocks.reshape(-1), out=out)


def _decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: _DecodeGroup,
                      scale: float) -> torch.Tensor:
    """One query per sequence: a single batched gather of the blocks and one masked SDPA."""
    n, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    k = _gather_blocks("k", k_cache, group.block_tables).view(n, -1, num_kv_heads, head_dim).to(query.dtype)
    v = _gather_blocks("v", v_cache, group.block_tables).view(n, -1, num_kv_heads, head_dim).to(query.dtype)
    if group.pad_index is not None:
        # Slots past a sequence's end may hold anything (an uninitialised cache can hold NaN, and
        # 0 * NaN = NaN after the softmax): zero them, the mask then removes their weight.
        k.view(-1, num_kv_heads * head_dim).index_fill_(0, group.pad_index, 0)
        v.view(-1, num_kv_heads * head_dim).index_fill_(0, group.pad_index, 0)
    # The query heads that share a KV head become query rows of that head: no K/V repeat.
    q = query.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=group.mask,
                                         scale=scale)
    return out.reshape(n, num_heads, head_dim)


def _prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_table: torch.Tensor, seq_len: int, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """One sequence's new tokens ``[q_len, heads, head_dim]`` over its whole context, causally
    (``mask`` is None when the chunk is the whole context, else the chunk's causal mask)."""
    head_dim = query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    blocks = block_table[: -(-seq_len // block_size)]
    k = _gather_blocks("k", k_cache, blocks).view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
    v = _gather_blocks("v", v_cache, blocks).view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
    k, v = k.to(query.dtype), v.to(query.dtype)  # (a no-op unless --kv-cache-dtype differs from the model's)
    out = F.scaled_dot_product_attention(query.transpose(0, 1), k, v, attn_mask=mask, is_causal=mask is None,
                                         scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def _chunk_mask(q_len: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Query j of a chunk of ``q_len`` new tokens sees context positions ``<= seq_len - q_len + j``."""
    if q_len == seq_len:
        return None
    pos = torch.arange(seq_len, device=device)
    return pos.unsqueeze(0) <= pos[seq_len - q_len:].unsqueeze(1)


@dataclass
class _DecodeGroup:
    rows: torch.Tensor | None  # query rows of the group (None: the whole batch, in order)
    block_tables: torch.Tensor  # int64 [n, blocks of the group's longest sequence]
    mask: torch.Tensor  # bool [n, 1, 1, positions]: True where a position is inside the sequence
    pad_index: torch.Tensor | None  # flat (sequence, position) indices past each sequence's end


@dataclass
class _Plan:
    """How one step's batch is split, built once per step and shared by every layer."""

    prefills: list[tuple[int, int, int, int, torch.Tensor | None]]  # (sequence, first row, q_len, seq_len, mask)
    decode_groups: list[_DecodeGroup]
    seq_lens_cpu: list[int]  # what the plan was built from, in case a caller refills the same metadata
    query_lens_cpu: list[int]
    block_tables: torch.Tensor

    def matches(self, md: AttentionMetadata) -> bool:
        return (self.seq_lens_cpu == md.seq_lens_cpu and self.query_lens_cpu == md.query_lens_cpu
                and torch.equal(self.block_tables, md.block_tables))


def _decode_group(md: AttentionMetadata, seqs: list[int], rows: list[int] | None) -> _DecodeGroup:
    lens = torch.tensor([md.seq_lens_cpu[i] for i in seqs])
    num_blocks = -(-int(lens.max()) // md.block_size)
    length = num_blocks * md.block_size
    inside = torch.arange(length) < lens.unsqueeze(1)
    device = md.block_tables.device
    if rows is None:
        tables = md.block_tables[:, :num_blocks]
    else:
        tables = md.block_tables[torch.tensor(seqs, device=device), :num_blocks]
    # Table entries past a sequence's last block point at its first block (any valid block would do):
    # every position past the sequence's end is zeroed after the gather (see _decode_attention), since
    # a short sequence's first block may itself hold unwritten slots.
    used_blocks = (lens + md.block_size - 1) // md.block_size
    in_table = (torch.arange(num_blocks) < used_blocks.unsqueeze(1)).to(device)
    tables = torch.where(in_table, tables, tables[:, :1])
    tail = ~inside
    pad_index = tail.view(-1).nonzero().squeeze(1)
    return _DecodeGroup(
        rows=None if rows is None else torch.tensor(rows, device=device), block_tables=tables.long(),
        mask=inside[:, None, None, :].to(device), pad_index=pad_index.to(device) if pad_index.numel() else None)


def _group_decodes(md: AttentionMetadata, decodes: list[int], rows: list[int]) -> list[_DecodeGroup]:
    """Decodes sorted by length into at most 4 groups, so short contexts are not padded to the longest.
    Fewer groups are used while padding stays under 2x: each extra group costs a gather, an SDPA and a
    scatter per layer, which on the CPU outweighs the padded work (bench/model_step.py, batch 32,
    contexts 75-300: one group 293 tok/s in bf16 against 228 with the old 1.25x bound)."""
    if not decodes:
        return []
    lens = [md.seq_lens_cpu[i] for i in decodes]
    order = sorted(range(len(decodes)), key=lens.__getitem__)
    chunks = [order]
    for k in (1, 2, 3, 4):
        chunks = [order[j * len(order) // k:(j + 1) * len(order) // k] for j in range(k)]
        chunks = [c for c in chunks if c]
        padded = sum(len(c) * -(-lens[c[-1]] // md.block_size) for c in chunks) * md.block_size
        if padded <= 2.0 * sum(lens):
            break
    if len(chunks) == 1 and len(decodes) == md.num_seqs:
        return [_decode_group(md, decodes, None)]
    return [_decode_group(md, [decodes[j] for j in c], [rows[j] for j in c]) for c in chunks]


def _plan(md: AttentionMetadata) -> _Plan:
    plan = getattr(md, "_torch_attention_plan", None)
    if plan is None or not plan.matches(md):
        prefills, decodes, rows, start = [], [], [], 0
        for i, (q_len, seq_len) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu, strict=True)):
            if q_len == 1:
                decodes.append(i)
                rows.append(start)
            else:
                prefills.append((i, start, q_len, seq_len, _chunk_mask(q_len, seq_len, md.seq_lens.device)))
            start += q_len
        plan = _Plan(prefills, _group_decodes(md, decodes, rows), list(md.seq_lens_cpu), list(md.query_lens_cpu),
                     md.block_tables.clone())
        md._torch_attention_plan = plan  # cached on this step's metadata: every layer reuses it
    return plan


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    attn_metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of the flat batch's queries ``[T, heads, head_dim]`` over each sequence's cached context."""
    plan = _plan(attn_metadata)
    groups = plan.decode_groups
    if not plan.prefills and len(groups) == 1 and groups[0].rows is None:
        return _decode_attention(query, k_cache, v_cache, groups[0], scale)
    out = torch.empty_like(query)
    for i, start, q_len, seq_len, mask in plan.prefills:
        out[start:start + q_len] = _prefill_attention(
            query[start:start + q_len], k_cache, v_cache, attn_metadata.block_tables[i], seq_len, mask, scale)
    for g in groups:
        out[g.rows] = _decode_attention(query[g.rows], k_cache, v_cache, g, scale)
    return out


def select_backend(device: torch.device) -> ModuleType:
    """The backend module for ``device``: env override, else triton on CUDA when it imports, else torch."""
    name = os.environ.get(BACKEND_ENV, "").strip().lower()
    if name:
        if name not in _BACKEND_MODULES:
            raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(_BACKEND_MODULES)}")
        return importlib.import_module(_BACKEND_MODULES[name])
    if device.type == "cuda":
        try:
            return importlib.import_module(_BACKEND_MODULES["triton"])
        except ImportError:
            pass
    if device.type == "cpu":
        from kubeinfer.engine.layers import cpu_kernels

        if cpu_kernels.available():
            return importlib.import_module(_BACKEND_MODULES["cpu"])
    return importlib.import_module(__name__)


class Attention(nn.Module):
    """Applies RoPE, stores the new tokens' K/V in the paged cache, then attends over each sequence's
    context. ``rotary_emb`` is a ``RotaryEmbedding`` (None: no rotary embedding)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary_emb: nn.Module | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.rotary_emb = rotary_emb
        self._backend: ModuleType | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self._backend is None:
            self._backend = select_backend(q.device)
        k_cache, v_cache = kv_cache
        fused = getattr(self._backend, "rotary_and_store", None)
        if fused is not None and self.rotary_emb is not None:
            q = fused(positions, q, k, v, self.rotary_emb.cos_sin_cache, k_cache, v_cache, attn_metadata.slot_mapping)
        else:
            if self.rotary_emb is not None:
                q, k = self.rotary_emb(positions, q, k)
            q = q.reshape(-1, self.num_heads, self.head_dim)
            k = k.reshape(-1, self.num_kv_heads, self.head_dim)
            v = v.reshape(-1, self.num_kv_heads, self.head_dim)
            self._backend.store_kv_cache(k, v, k_cache, v_cache, attn_metadata.slot_mapping)
        out = self._backend.paged_attention(q, k_cache, v_cache, attn_metadata, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)
