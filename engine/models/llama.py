"""The Llama family in one implementation: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

They differ only by ModelConfig flags: qkv/o/mlp bias, q/k RMSNorm, tied embeddings, rope scaling,
head_dim. Q/K/V and gate/up are fused into single matmuls when the weights load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from kubeinfer.engine.attention_metadata import AttentionMetadata
from kubeinfer.engine.layers import ops
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kubeinfer.engine.layers.norm import RMSNorm
from kubeinfer.engine.layers.rotary import get_rope
from kubeinfer.engine.models.config import ModelConfig
from torch import nn

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.qkv_bias, tp_rank, tp_size)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, tp_rank, tp_size)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        rotary_emb = get_rope(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, rotary_emb)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(self.attn(positions, q, k, v, attn_metadata, kv_cache))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], cfg.mlp_bias, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, cfg.mlp_bias, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, tp_rank, tp_size)
        self.mlp = LlamaMLP(cfg, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata, kv_cache)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, tp_rank, tp_size) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata, kv_cache)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard id)
    stacked_params: ClassVar[dict[str, tuple[str, str | int]]] = {
        ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, tp_rank, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        # KV heads this rank stores: its per-layer cache is [num_blocks, block_size, this, head_dim]
        self.num_kv_heads_per_rank = self.model.layers[0].self_attn.num_kv_heads if cfg.num_layers else 0
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata, kv_caches)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[N, vocab]``."""
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the fused, sharded parameters; every parameter must be set."""
        for module in self.modules():  # packed copies of the old weights would go stale
            if getattr(module, "packed_weight", None) is not None:
                module.packed_weight = None
        params = dict(self.named_parameters())
        missing = set(params)
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            target, shard_id = name, None
            for fragment, (fused, fused_shard) in self.stacked_params.items():
                if fragment in name:
                    target, shard_id = name.replace(fragment, fused), fused_shard
                    break
            if (target not in params and name.endswith(".bias") and isinstance(tensor, torch.Tensor)
                    and not tensor.any()):
                continue  # GPTQ checkpoints of bias-free models may carry zero biases (vLLM skips them too)
            param = self._param(params, target, name)
            if shard_id is None:
                getattr(param, "weight_loader", _default_loader)(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
            missing.discard(target)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing))}")

    @staticmethod
    def _param(params: dict[str, nn.Parameter], target: str, name: str) -> nn.Parameter:
        if target not in params:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        return params[target]


def _default_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    param.data.copy_(loaded_weight)
