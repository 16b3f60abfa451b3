"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, reference counts, prefix caching.

Prefix caching: every full block is named by a hash chain over its tokens (the hash of the
previous block plus this block's token ids), so equal hashes mean equal prefixes. A new
sequence reuses the cached blocks of its longest cached prefix. A block whose reference count
drops to zero keeps its contents and its hash and joins the free queue; it is evicted (its hash
forgotten) only when the free queue hands it out again, least recently freed first.

Copy-on-write: after an ``n > 1`` fork the siblings share the prompt's last partial block. The
first sibling that writes into a shared block gets a fresh copy; the copy (src, dst) is queued
for the model runner, which applies it to the KV tensors before the next forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as SequenceOf

from kubeinfer.engine.sequence import Sequence


class Block:
    __slots__ = ("block_hash", "block_id", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None


def hash_block(parent_hash: int | None, token_ids: SequenceOf[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, in eviction order (front first). Cached ones keep their hash.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[int, int] = {}  # block hash -> block id
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (free cached blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------------------------
    def update_block_hashes(self, seq: Sequence) -> None:
        """Hash the sequence's newly completed full blocks (each block is hashed once in its life)."""
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[i - 1] if i else None, tokens[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """The cached blocks of ``seq``'s longest cached prefix, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        self.update_block_hashes(seq)
        found: list[int] = []
        for block_hash in seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---- allocation ------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: SequenceOf[int] = ()) -> bool:
        """Grow ``seq``'s block table to hold its next ``num_new_tokens`` tokens; False if blocks run out.

        For a sequence without blocks, ``computed_blocks`` (from ``get_computed_blocks``) become the
        head of its table and the caller advances ``num_computed_tokens`` past them.
        """
        bs, table = self.block_size, seq.block_table
        start = len(computed_blocks) * bs if computed_blocks else seq.num_computed_tokens
        have = len(computed_blocks) if computed_blocks else len(table)
        num_new_blocks = max(0, self.blocks_needed(start + num_new_tokens) - have)
        cow_index = start // bs if start % bs else -1
        need_cow = 0 <= cow_index < len(table) and self.blocks[table[cow_index]].ref_count > 1
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + need_cow + revived > len(self.free_queue):
            return False
        if computed_blocks:
            for block_id in computed_blocks:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free_queue[block_id]
                block.ref_count += 1
            table.extend(computed_blocks)
            seq.num_registered_blocks = len(computed_blocks)
        if need_cow:  # a new list object tells mirrors of the table (model runner) to resync
            seq.block_table = table = list(table)
            src = table[cow_index]
            self.blocks[src].ref_count -= 1
            table[cow_index] = self._pop_free_block()
            self.pending_copies.append((src, table[cow_index]))
        for _ in range(num_new_blocks):
            table.append(self._pop_free_block())
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, start + num_new_tokens)
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its contents are about to be overwritten
            if self.cached_blocks.get(block.block_hash) == block_id:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks that are full once this step has written ``num_tokens`` tokens."""
        num_full = num_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        self.update_block_hashes(seq)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            if block.block_hash is None and block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block.block_id
        seq.num_registered_blocks = num_full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares all of ``parent``'s blocks (copy-on-write later)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_registered_blocks = parent.num_registered_blocks

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Tail blocks go first in the queue so a prefix outlives its tail."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:  # nothing worth keeping: hand it out first
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0
        seq.num_computed_tokens = 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.block_hash = None
        self.cached_blocks = {h: b for h, b in self.cached_blocks.items() if self.blocks[b].block_hash == h}
