"""Vocabulary embedding and LM head, sharded by vocabulary rows for tensor parallelism."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kubeinfer.engine import cpu_replay
from kubeinfer.engine.layers import cpu_linear
from kubeinfer.engine.layers.quantization import QuantizedWeight
from torch import nn


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.num_embeddings, self.tp_rank, self.tp_size = num_embeddings, tp_rank, tp_size
        self.shard_size = -(-num_embeddings // tp_size)  # ceil: the last shard is zero-padded
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.quantized: QuantizedWeight | None = None  # set when the table is kept quantized (quantization.py)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        size = max(0, min(self.shard_size, loaded_weight.shape[0] - self.vocab_start))
        param.data.zero_()
        param.data[:size].copy_(loaded_weight.narrow(0, self.vocab_start, size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1 and self.quantized is not None:  # one kernel call (a recorded CPU step replays it)
            return self._lookup(input_ids)
        if self.tp_size == 1:  # a lookup, not a kernel: a recorded CPU decode step re-runs it (cpu_replay)
            return cpu_replay.eager_op(lambda: self._lookup(input_ids))
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        y = self._lookup(local.masked_fill(outside, 0))
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(y)
        return y

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.embedding(ids, self.weight.dtype)
        return F.embedding(ids, self.weight)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to float32 logits over the whole vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size)
        self.packed_weight: torch.Tensor | None = None  # set by onednn.prepack_model on the CPU

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            logits = self.quantized.matmul(hidden_states)
        elif hidden_states.device.type == "cpu":
            logits = cpu_linear.linear(hidden_states, self.weight, self.packed_weight, None)
        else:
            logits = F.linear(hidden_states, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)[..., : self.num_embeddings]
        return logits.float()
