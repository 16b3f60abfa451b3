"""The torch paged-attention backend against dense causal attention on the same K/V."""

from __future__ import annotations

import random

import pytest
import torch
from kubeinfer.engine.attention_metadata import AttentionMetadata
from kubeinfer.engine.layers import attention
from kubeinfer.engine.layers.attention import paged_attention, select_backend, store_kv_cache

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention of the last ``len(q)`` positions of one sequence over ``k``/``v`` (all its context)."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    offset = k.shape[0] - q.shape[0]
    causal = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)


def _run(shapes: list[tuple[int, int]], seed: int = 0):
    """``shapes``: (q_len, seq_len) per sequence. Writes each context's K/V (the cached part first),
    then runs one step; returns our output and the reference."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // BLOCK) for _, s in shapes) + 2
    # an uninitialised cache: NaN outside the contexts must not leak into the result
    k_cache = torch.full((num_blocks, BLOCK, KV_HEADS, DIM), float("nan"))
    v_cache = torch.full((num_blocks, BLOCK, KV_HEADS, DIM), float("nan"))
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables, ks, vs, slots, cached_slots, qs = [], [], [], [], [], []
    for q_len, seq_len in shapes:
        blocks = [free.pop() for _ in range(-(-seq_len // BLOCK))]
        tables.append(blocks)
        ks.append(torch.randn(seq_len, KV_HEADS, DIM, generator=g))
        vs.append(torch.randn(seq_len, KV_HEADS, DIM, generator=g))
        qs.append(torch.randn(q_len, HEADS, DIM, generator=g))
        slot = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len)]
        cached_slots.append(slot[: seq_len - q_len])
        slots += slot[seq_len - q_len:]
    for k, v, s in zip(ks, vs, cached_slots, strict=True):
        if s:
            store_kv_cache(k[: len(s)], v[: len(s)], k_cache, v_cache, torch.tensor(s))
    width = max(map(len, tables))
    qlens, slens = [q for q, _ in shapes], [s for _, s in shapes]
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()],
                                                                       dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(qlens), max_seq_len=max(slens), block_size=BLOCK, query_lens_cpu=qlens, seq_lens_cpu=slens)
    new_k = torch.cat([k[s - q:] for k, (q, s) in zip(ks, shapes, strict=True)])
    new_v = torch.cat([v[s - q:] for v, (q, s) in zip(vs, shapes, strict=True)])
    store_kv_cache(new_k, new_v, k_cache, v_cache, md.slot_mapping)
    scale = DIM**-0.5
    out = paged_attention(torch.cat(qs), k_cache, v_cache, md, scale)
    ref = torch.cat([_reference(q, k, v, scale) for q, k, v in zip(qs, ks, vs, strict=True)])
    return out, ref


@pytest.mark.parametrize("shapes", [
    [(1, 9), (1, 1), (1, 16), (1, 5)],          # pure decode: one batched call
    [(7, 7), (3, 3)],                           # prefill
    [(5, 13), (4, 4)],                          # chunked prefill over cached blocks
    [(1, 10), (6, 11), (1, 3), (2, 8), (1, 1)],  # mixed: decodes between prefills
    [(1, 3), (1, 60), (1, 2), (1, 33), (1, 61), (1, 1), (1, 17)],  # decode, spread lengths: grouped
    [(1, 50), (3, 9), (1, 2), (1, 45), (1, 1)],  # mixed with spread decodes
])
def test_matches_dense_reference(shapes) -> None:
    out, ref = _run(shapes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_store_skips_negative_slots() -> None:
    k_cache, v_cache = torch.zeros(2, BLOCK, KV_HEADS, DIM), torch.zeros(2, BLOCK, KV_HEADS, DIM)
    key, value = torch.ones(3, KV_HEADS, DIM), 2 * torch.ones(3, KV_HEADS, DIM)
    store_kv_cache(key, value, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.view(-1, KV_HEADS, DIM), v_cache.view(-1, KV_HEADS, DIM)
    assert flat_k[[0, 5]].eq(1).all() and flat_v[[0, 5]].eq(2).all()
    assert flat_k.sum() == 2 * KV_HEADS * DIM


def test_backend_selection(monkeypatch) -> None:
    from kubeinfer.engine.layers import cpu_attention, cpu_kernels

    monkeypatch.delenv(attention.BACKEND_ENV, raising=False)
    expected = cpu_attention if cpu_kernels.available() else attention
    assert select_backend(torch.device("cpu")) is expected
    monkeypatch.setenv(attention.BACKEND_ENV, "torch")
    assert select_backend(torch.device("cpu")) is attention
    assert select_backend(torch.device("cuda")) is attention
    monkeypatch.setenv(attention.BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="torch, triton, cpu"):
        select_backend(torch.device("cpu"))


def test_refilled_metadata_is_replanned() -> None:
    """A caller may reuse one AttentionMetadata object and refill it in place for the next step."""
    k_cache = torch.randn(4, BLOCK, KV_HEADS, DIM)
    v_cache = torch.randn(4, BLOCK, KV_HEADS, DIM)
    q = torch.randn(2, HEADS, DIM)
    md = AttentionMetadata(
        slot_mapping=torch.tensor([-1, -1]), query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        seq_lens=torch.tensor([3, 5], dtype=torch.int32), block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        max_query_len=1, max_seq_len=5, block_size=BLOCK, query_lens_cpu=[1, 1], seq_lens_cpu=[3, 5])
    paged_attention(q, k_cache, v_cache, md, 0.25)
    md.block_tables[0, 0] = 1
    md.seq_lens[:] = torch.tensor([4, 2])
    md.seq_lens_cpu[:] = [4, 2]
    out = paged_attention(q, k_cache, v_cache, md, 0.25)
    for i, (block, length) in enumerate([(1, 4), (2, 2)]):
        k, v = k_cache[block, :length], v_cache[block, :length]
        torch.testing.assert_close(out[i:i + 1], _reference(q[i:i + 1], k, v, 0.25))


def test_inside_and_outside_inference_mode() -> None:
    with torch.inference_mode():
        inside, ref = _run([(1, 9), (1, 30)], seed=3)
    outside, _ = _run([(1, 9), (1, 30)], seed=3)
    torch.testing.assert_close(inside, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outside, ref, atol=1e-5, rtol=1e-5)
