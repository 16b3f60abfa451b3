"""BlockManager: allocation, ref counts, prefix caching with LRU eviction, copy-on-write."""

from __future__ import annotations

import pytest
from kubeinfer.engine.core.block_manager import BlockManager
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.sequence import Request, Sequence

BS = 4


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Request(rid, None, tokens, SamplingParams()).seqs[0]


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Like the scheduler: reuse cached blocks, allocate the rest; returns the cached token count."""
    computed = bm.get_computed_blocks(seq)
    cached = len(computed) * bm.block_size
    assert bm.allocate_slots(seq, seq.num_tokens - cached, computed)
    seq.num_computed_tokens = seq.num_tokens
    return cached


def assert_all_free(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.usage == 0.0


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(10, BS)
    seq = make_seq(list(range(10)))
    admit(bm, seq)
    assert len(seq.block_table) == 3  # 10 tokens / 4 per block
    assert bm.num_free_blocks == 7
    assert bm.usage == pytest.approx(0.3)
    seq.token_ids.append(99)  # decode one token: still fits the third block
    assert bm.allocate_slots(seq, 1)
    seq.num_computed_tokens += 1
    assert len(seq.block_table) == 3
    seq.token_ids.extend([100, 101])
    assert bm.allocate_slots(seq, 2)
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert_all_free(bm)


def test_allocation_fails_cleanly_when_blocks_run_out() -> None:
    bm = BlockManager(3, BS)
    a = make_seq(list(range(8)), "a")
    admit(bm, a)
    b = make_seq(list(range(100, 108)), "b")
    assert not bm.allocate_slots(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1  # nothing leaked by the failed attempt
    bm.free(a)
    assert_all_free(bm)


def test_prefix_cache_hit_on_repeated_prompt() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(14))  # 3 full blocks + 2 tokens
    first = make_seq(list(prompt), "a")
    assert admit(bm, first) == 0
    bm.free(first)
    assert_all_free(bm)  # cached blocks count as free
    second = make_seq(list(prompt), "b")
    assert admit(bm, second) == 12
    assert second.block_table[:3] == first_blocks(bm, prompt)
    # A prompt that is exactly full blocks still leaves its last token to compute.
    bm.free(second)
    exact = make_seq(list(range(12)), "c")
    assert admit(bm, exact) == 8
    bm.free(exact)
    assert_all_free(bm)


def first_blocks(bm: BlockManager, prompt: list[int]) -> list[int]:
    probe = make_seq(list(prompt), "probe")
    return bm.get_computed_blocks(probe)


def test_shared_prefix_blocks_are_ref_counted() -> None:
    bm = BlockManager(16, BS)
    system = list(range(8))
    a, b = make_seq([*system, 50, 51, 52], "a"), make_seq([*system, 60, 61], "b")
    admit(bm, a)
    assert admit(bm, b) == 8
    assert a.block_table[:2] == b.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert_all_free(bm)


def test_different_prefix_same_block_content_does_not_hit() -> None:
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    admit(bm, a)
    b = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9], "b")  # second block equal, first differs: the chain breaks
    assert admit(bm, b) == 0


def test_eviction_is_lru_and_only_under_pressure() -> None:
    bm = BlockManager(6, BS)
    old, new = make_seq(list(range(9)), "old"), make_seq(list(range(100, 109)), "new")
    admit(bm, old)
    bm.free(old)
    admit(bm, new)
    bm.free(new)
    assert len(bm.cached_blocks) == 4  # 2 full blocks each, all still cached
    # Needs 3 blocks: the 2 unhashed tail blocks go first, then the least recently freed cached block.
    filler = make_seq(list(range(200, 212)), "filler")
    admit(bm, filler)
    assert len(bm.get_computed_blocks(make_seq(list(range(100, 109))))) == 2  # newest prefix survived
    assert len(bm.get_computed_blocks(make_seq(list(range(9))))) == 1  # oldest lost its tail block
    bm.free(filler)
    assert_all_free(bm)
    # Under full pressure everything cached is evicted, and a repeated prompt simply misses.
    big = make_seq(list(range(300, 324)), "big")
    admit(bm, big)
    assert set(bm.cached_blocks.values()) == set(big.block_table)  # only big's own blocks are cached
    bm.free(big)
    assert bm.get_computed_blocks(make_seq(list(range(9)))) == []
    assert_all_free(bm)


def test_copy_on_write_after_fork() -> None:
    bm = BlockManager(10, BS)
    parent = make_seq(list(range(6)), "p")  # 1 full block + a partial block with 2 tokens
    admit(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    shared_tail = parent.block_table[1]
    assert bm.blocks[shared_tail].ref_count == 2
    # Each appends its own sampled token into the shared partial block: the first writer copies.
    child.token_ids.append(7)
    assert bm.allocate_slots(child, 1)
    assert child.block_table[1] != shared_tail
    assert child.block_table[0] == parent.block_table[0]
    assert bm.take_pending_copies() == [(shared_tail, child.block_table[1])]
    parent.token_ids.append(8)
    assert bm.allocate_slots(parent, 1)
    assert parent.block_table[1] == shared_tail  # sole owner now: writes in place
    assert bm.take_pending_copies() == []
    bm.free(parent)
    bm.free(child)
    assert_all_free(bm)


def test_copy_on_write_needs_a_free_block() -> None:
    bm = BlockManager(2, BS)
    parent = make_seq(list(range(6)), "p")
    admit(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    child.token_ids.append(1)
    assert not bm.allocate_slots(child, 1)  # no block for the copy: caller must preempt
    bm.free(child)
    bm.free(parent)
    assert_all_free(bm)


def test_prefix_cache_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)), "a")
    admit(bm, a)
    bm.free(a)
    assert admit(bm, make_seq(list(range(9)), "b")) == 0
    assert bm.cached_blocks == {}
