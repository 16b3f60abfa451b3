"""The flat-batch description that the model runner hands to every attention layer.

A step packs B sequences' new tokens into one flat batch of T tokens with no padding.
Sequence i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; its context
(cached tokens plus the new ones) is ``seq_lens[i]`` tokens long, read through
``block_tables[i]``. Each new token's K/V is written at ``slot_mapping[t]``
(``block_id * block_size + offset``; -1 means "do not write").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context length including the new tokens
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host-side copies, so backends that loop or build masks never sync with the device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # True for DecodeGraphs' static buffers: the tensors hold each step's facts, the host lists only bounds.
    static_buffers: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
