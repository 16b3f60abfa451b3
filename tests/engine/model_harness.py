"""A minimal paged runner for model tests: hand-built AttentionMetadata, blocks allocated out of order.

It drives ``model(input_ids, positions, attn_metadata, kv_caches)`` the way the engine's model runner
does (flat batch, chunked prefill, batched decode) so model tests need no scheduler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from kubeinfer.engine.attention_metadata import AttentionMetadata


@dataclass
class Seq:
    tokens: list[int]
    num_prompt: int
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # one row per computed position

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt:]


class PagedRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4, seed: int = 0,
                 cache_dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        self.model, self.block_size = model, block_size
        device = next(model.parameters()).device
        shape = (num_blocks, block_size, model.num_kv_heads_per_rank, cfg.head_dim)
        dtype = cache_dtype or cfg.dtype  # (the engine's --kv-cache-dtype; None: the model's)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)  # non-contiguous, out-of-order block tables
        self.device = device

    def step(self, work: list[tuple[Seq, int]]) -> None:
        """Run ``n`` new tokens of each ``(seq, n)``; a sequence whose known tokens are all computed
        gets its greedy next token appended."""
        ids, positions, slots, qlens, slens = [], [], [], [], []
        for seq, n in work:
            start = seq.num_computed
            while len(seq.blocks) * self.block_size < start + n:
                seq.blocks.append(self.free.pop())
            ids += seq.tokens[start:start + n]
            positions += range(start, start + n)
            slots += [seq.blocks[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, start + n)]
            qlens.append(n)
            slens.append(start + n)
        width = max(len(seq.blocks) for seq, _ in work)
        tables = [seq.blocks + [0] * (width - len(seq.blocks)) for seq, _ in work]
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32,
                                         device=dev),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(qlens), max_seq_len=max(slens), block_size=self.block_size,
            query_lens_cpu=qlens, seq_lens_cpu=slens,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), md,
                                self.kv_caches)
            logits = self.model.compute_logits(hidden).cpu()
        row = 0
        for seq, n in work:
            seq.logits.extend(logits[row:row + n])
            row += n
            seq.num_computed += n
            if seq.num_computed == len(seq.tokens):
                seq.tokens.append(int(logits[row - 1].argmax()))


def generate_paged(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, chunk: int = 5,
                   block_size: int = 4, cache_dtype: torch.dtype | None = None) -> list[Seq]:
    """Greedy generation: prompts prefilled ``chunk`` tokens at a time (several sequences per step,
    mixed with decodes), then batched decode steps until every sequence has ``max_new_tokens``."""
    need = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    runner = PagedRunner(model, num_blocks=need + 3, block_size=block_size, cache_dtype=cache_dtype)
    seqs = [Seq(tokens=list(p), num_prompt=len(p)) for p in prompts]
    while any(len(s.generated) < max_new_tokens for s in seqs):
        work = []
        for i, seq in enumerate(seqs):
            if len(seq.generated) >= max_new_tokens or (i > 0 and seqs[i - 1].num_computed == 0):
                continue  # sequence i joins one step after sequence i-1 started: mixed batches
            work.append((seq, min(chunk, len(seq.tokens) - seq.num_computed)))
        runner.step(work)
    return seqs
