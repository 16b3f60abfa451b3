"""ModelConfig: what the engine needs to know about a model, independent of its file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# architecture name -> (qkv bias is always on, q/k RMSNorm)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}


def check_architecture(architecture: str | None) -> str:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # totals, not per tensor-parallel rank
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]  # every id that ends generation by default
    dtype: torch.dtype
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: Any, dtype: torch.dtype, eos_token_ids: list[int] | None = None) -> ModelConfig:
        """Build from a transformers ``PretrainedConfig`` (handles v4 ``rope_scaling`` and v5 ``rope_parameters``)."""
        arch = check_architecture((getattr(hf, "architectures", None) or [None])[0])
        always_qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported activation {act!r} (only silu)")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        attention_bias = bool(getattr(hf, "attention_bias", False))
        max_pos = hf.max_position_embeddings
        window = getattr(hf, "sliding_window", None)
        if window and (arch == "MistralForCausalLM" or getattr(hf, "use_sliding_window", False)):
            max_pos = min(max_pos, window)  # no sliding-window attention: stay within one window
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        eos = eos_token_ids if eos_token_ids is not None else _as_list(getattr(hf, "eos_token_id", None))
        return cls(
            architecture=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim, max_position_embeddings=max_pos,
            bos_token_id=getattr(hf, "bos_token_id", None), eos_token_ids=eos, dtype=dtype,
            intermediate_size=hf.intermediate_size, rms_norm_eps=hf.rms_norm_eps, rope_theta=float(theta),
            rope_scaling=rope or None, tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=always_qkv_bias or attention_bias, o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=qk_norm,
        )


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
