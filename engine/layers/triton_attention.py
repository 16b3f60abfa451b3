"""Triton attention backend: paged KV-cache writes and one unified paged-attention kernel.

Same signature as the torch backend in ``attention.py``::

    store_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    paged_attention(query, k_cache, v_cache, attn_metadata, scale) -> output

KV cache layout (per layer, K and V alike): ``[num_blocks, block_size, num_kv_heads, head_dim]``.

One kernel serves every batch shape the scheduler builds -- pure decode, pure prefill,
chunked prefill over a cached prefix, and mixes of all three in one launch. Its grid is
``(q_blocks, num_kv_heads, num_splits)``:

* A *q block* is up to ``BLOCK_Q`` consecutive new tokens of ONE sequence. Each program
  handles all ``heads // kv_heads`` query heads that share its KV head, so the tile of
  ``BLOCK_M = BLOCK_Q * queries_per_kv`` query rows reads every K/V tile once (GQA reuse).
  The grid's first axis is the upper bound ``T // BLOCK_Q + num_seqs`` (no host sync);
  a program finds its sequence by binary search over ``query_start_loc`` and leaves at
  once when it is past its sequence's last q block.
* The context is read in tiles of ``TILE_N`` key positions gathered through the block
  table (any power-of-two ``block_size``), with an online softmax in fp32 (exp2 domain).
  Query ``j`` of a sequence with ``q_len`` new tokens and ``seq_len`` context tokens
  sees key positions ``<= seq_len - q_len + j``.
* ``num_splits > 1`` is flash-decoding: each split covers a contiguous range of tiles,
  writes a normalised partial output plus its running max and sum, and a small reduce
  kernel merges the splits. It is chosen for decode batches that would not fill the GPU
  (few sequences x KV heads, long contexts). How many tiles a split covers is computed on
  the device from the real ``seq_len``, so the result is correct for any ``num_splits``
  (a CUDA graph captured with one value stays correct when contexts grow).

No autotuning: launch configs come from a small deterministic table (``_launch_config``),
which keeps the kernel safe to capture in CUDA graphs (autotune would benchmark inside the
capture) and keeps the interpreter tests fast.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from kubeinfer.engine.attention_metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
# Every per-step fact is read from device memory and no host sync happens: steps can be captured in CUDA
# graphs (engine/cuda_graphs.py); the host facts (max_seq_len, num_seqs) only pick the launch shape.
CUDA_GRAPH_SAFE = True


# --------------------------------------------------------------------------- KV-cache write


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    key_stride_t,
    key_stride_h,
    value_stride_t,
    value_stride_h,
    kc_stride_block,
    kc_stride_slot,
    kc_stride_head,
    vc_stride_block,
    vc_stride_slot,
    vc_stride_head,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]

    key = tl.load(key_ptr + token * key_stride_t + heads[:, None] * key_stride_h + dims[None, :], mask=mask)
    k_dst = k_cache_ptr + block * kc_stride_block + offset * kc_stride_slot
    tl.store(
        k_dst + heads[:, None] * kc_stride_head + dims[None, :],
        key.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    value = tl.load(
        value_ptr + token * value_stride_t + heads[:, None] * value_stride_h + dims[None, :], mask=mask
    )
    v_dst = v_cache_ptr + block * vc_stride_block + offset * vc_stride_slot
    tl.store(
        v_dst + heads[:, None] * vc_stride_head + dims[None, :],
        value.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[T, kv_heads, head_dim]`` into the paged caches at ``slot_mapping[T]``.

    ``slot = block_id * block_size + offset``; tokens whose slot is negative are skipped.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes differ")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )


# --------------------------------------------------------------------------- attention


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """Index of the sequence owning global q block ``q_block``.

    Sequence ``i``'s q blocks start at ``query_start_loc[i] // BLOCK_Q + i`` (an upper bound
    that needs no prefix sum over ceil-divided lengths); binary search for the last start
    that is ``<= q_block``.
    """
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
    out_ptr,
    part_out_ptr,  # [T, heads, NUM_SPLITS, HEAD_DIM_PAD] fp32 (split mode only)
    part_max_ptr,  # [T, heads, NUM_SPLITS] fp32
    part_sum_ptr,  # [T, heads, NUM_SPLITS] fp32
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale_log2,  # softmax scale * log2(e)
    num_seqs,
    num_heads,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    kc_stride_block,
    kc_stride_slot,
    kc_stride_head,
    vc_stride_block,
    vc_stride_slot,
    vc_stride_head,
    bt_stride,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Highest q blocks first: under the causal mask they read the most keys, so starting them
    # early shortens the tail of long prefills.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:  # past this sequence's last q block
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row m of the tile = query token (local_block * BLOCK_Q + m // QPK), head (kv_head * QPK + m % QPK).
    rows = tl.arange(0, BLOCK_M)
    q_pos = local_block * BLOCK_Q + rows // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_pos < q_len)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    token = (q_start + q_pos).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    query_abs_pos = context_len + q_pos  # causal limit of each row (inclusive)

    # Keys this q block needs: [0, context_len + last query position in the block].
    last_q = tl.minimum((local_block + 1) * BLOCK_Q, q_len) - 1
    kv_end = context_len + last_q + 1
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if NUM_SPLITS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * bt_stride
    k_head = k_cache_ptr + kv_head * kc_stride_head
    v_head = v_cache_ptr + kv_head * vc_stride_head

    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_N + tl.arange(0, TILE_N)
        key_valid = key_pos < kv_end
        block = tl.load(block_table + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        in_block = (key_pos % BLOCK_SIZE).to(tl.int64)

        k = tl.load(  # [HEAD_DIM_PAD, TILE_N]
            k_head + (block * kc_stride_block + in_block * kc_stride_slot)[None, :] + dims[:, None],
            mask=key_valid[None, :] & dim_valid[:, None],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2
        visible = key_valid[None, :] & (key_pos[None, :] <= query_abs_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v = tl.load(  # [TILE_N, HEAD_DIM_PAD]
            v_head + (block * vc_stride_block + in_block * vc_stride_slot)[:, None] + dims[None, :],
            mask=key_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=row_valid[:, None])
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)


@triton.jit
def _reduce_splits_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    num_heads,
    o_stride_t,
    o_stride_h,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Merge the splits of one (token, head): weights ``2^(m_s - max) * l_s`` over normalised outputs."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    base = (token * num_heads + head) * NUM_SPLITS
    m = tl.load(part_max_ptr + base + splits)
    total_max = tl.max(m, axis=0)
    total_max = tl.where(total_max == float("-inf"), 0.0, total_max)
    weight = tl.exp2(m - total_max) * tl.load(part_sum_ptr + base + splits)
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM_PAD + dims[None, :])
    denom = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        out_ptr + token * o_stride_t + head * o_stride_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per program (BLOCK_Q tokens x queries_per_kv heads, padded)
    tile_n: int  # key positions per inner-loop step
    num_splits: int  # flash-decoding partitions of the context (1 = off)
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(query: torch.Tensor, num_kv_heads: int, attn_metadata: AttentionMetadata) -> LaunchConfig:
    """Pick tile sizes and the split count from host-side batch facts only (no device sync).

    The shapes were checked offline against sm_90 register/shared-memory use (no spills for
    fp16/bf16 at head_dim 64 and 128): decode uses 16-row tiles on mma.sync; prefill uses
    128-row tiles over 8 warps (wgmma). fp32 uses the decode shape everywhere (its dots run
    on FMA units and larger tiles spill).
    """
    queries_per_kv = query.shape[1] // num_kv_heads
    min_block_m = max(16, triton.next_power_of_2(queries_per_kv))
    prefill_rows = attn_metadata.max_query_len * queries_per_kv
    if query.dtype != torch.float32 and prefill_rows >= 64:  # prefill work: tensor-core bound
        if prefill_rows >= 128:
            return LaunchConfig(max(min_block_m, 128), tile_n=64, num_splits=1, num_warps=8, num_stages=3)
        return LaunchConfig(max(min_block_m, 64), tile_n=64, num_splits=1, num_warps=4, num_stages=2)
    block_m = min_block_m
    tile_n = 64 if query.shape[2] <= 128 else 32
    num_splits = 1
    if query.is_cuda:
        # Flash-decoding: if sequences x KV heads leave SMs idle, split each context so that
        # about two programs run per SM, keeping >= 2 tiles per split.
        programs = attn_metadata.num_seqs * num_kv_heads
        sms = _sm_count(query.device.index or 0)
        if programs < sms:
            wanted = math.ceil(2 * sms / programs)
            longest = max(1, attn_metadata.max_seq_len // (2 * tile_n))
            num_splits = min(wanted, longest, 64)
            num_splits = 1 << (num_splits.bit_length() - 1)  # power of two: few compiled variants
    num_stages = 2 if query.dtype == torch.float32 else 3
    return LaunchConfig(block_m, tile_n, num_splits, num_warps=4, num_stages=num_stages)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of ``query [T, heads, head_dim]`` over each sequence's paged context.

    Returns ``[T, heads, head_dim]`` in ``query``'s dtype; accumulation is fp32.
    """
    return paged_attention_with_config(query, k_cache, v_cache, attn_metadata, scale, config=None)


def paged_attention_with_config(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_metadata: AttentionMetadata,
    scale: float,
    config: LaunchConfig | None,
) -> torch.Tensor:
    """``paged_attention`` with an explicit launch config (tests and benchmarks force each path)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if k_cache.shape[1] != attn_metadata.block_size:
        raise ValueError(
            f"cache block size {k_cache.shape[1]} != metadata block_size {attn_metadata.block_size}"
        )
    query = _last_dim_contiguous(query)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    cfg = config or _launch_config(query, num_kv_heads, attn_metadata)
    queries_per_kv = num_heads // num_kv_heads
    if cfg.block_m < queries_per_kv or cfg.block_m & (cfg.block_m - 1):
        raise ValueError(
            f"block_m={cfg.block_m} must be a power of two >= queries per KV head ({queries_per_kv})"
        )
    block_q = cfg.block_m // queries_per_kv
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    num_seqs = attn_metadata.num_seqs

    if cfg.num_splits > 1:
        part_out = torch.empty(
            num_tokens, num_heads, cfg.num_splits, head_dim_pad, dtype=torch.float32, device=query.device
        )
        part_max = torch.empty(
            num_tokens, num_heads, cfg.num_splits, dtype=torch.float32, device=query.device
        )
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # never touched

    grid = (num_tokens // block_q + num_seqs, num_kv_heads, cfg.num_splits)
    _paged_attention_kernel[grid](
        out,
        part_out,
        part_max,
        part_sum,
        query,
        k_cache,
        v_cache,
        attn_metadata.block_tables,
        attn_metadata.seq_lens,
        attn_metadata.query_start_loc,
        scale * _LOG2E,
        num_seqs,
        num_heads,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        attn_metadata.block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=cfg.block_m,
        BLOCK_Q=block_q,
        TILE_N=cfg.tile_n,
        NUM_SPLITS=cfg.num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.num_splits > 1:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            out,
            part_out,
            part_max,
            part_sum,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=cfg.num_splits,
            num_warps=1 if cfg.num_splits * head_dim_pad <= 2048 else 4,
        )
    return out


# --------------------------------------------------------------------------- helpers


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k/v caches must both be [num_blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[2] != num_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"cache has {k_cache.shape[2]} KV heads x {k_cache.shape[3]} dims, "
            f"tensors have {num_kv_heads} x {head_dim}"
        )
    block_size = k_cache.shape[1]
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k/v caches must be contiguous in head_dim")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
