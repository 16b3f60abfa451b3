"""Tiny random-weight checkpoints of every supported model flavour, built with transformers.

``make_tiny_checkpoint(kind, path)`` saves a float32 checkpoint (config.json, model.safetensors,
generation_config.json) plus a byte-level tokenizer with ChatML special tokens, so that
``load_model(path)`` and ``AutoModelForCausalLM.from_pretrained(path)`` both work on it.
Weights use a large ``initializer_range`` so greedy argmaxes are far from ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 320  # 256 bytes + 3 special tokens + unused rows
ENDOFTEXT, IM_START, IM_END = 256, 257, 258
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.3,
    bos_token_id=IM_START, eos_token_id=IM_END, pad_token_id=ENDOFTEXT, tie_word_embeddings=False,
)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}

# kind -> (model_type, config overrides)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama3_rope": ("llama", {"rope_parameters": _LLAMA3_ROPE, "rope_scaling": _LLAMA3_ROPE}),
    "mistral": ("mistral", {"sliding_window": None, "head_dim": 16}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}
TINY_KINDS = tuple(TINY_MODELS)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level: ids 0..255 are the bytes, then <|endoftext|>, <|im_start|>, <|im_end|>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]


def make_tiny_config(kind: str):
    model_type, overrides = TINY_MODELS[kind]
    return AutoConfig.for_model(model_type, **{**_BASE, **overrides})


def make_tiny_checkpoint(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Save a tiny float32 checkpoint of ``kind`` (one of TINY_KINDS) into ``path``; returns ``path``."""
    if kind not in TINY_MODELS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(TINY_KINDS)}")
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_tiny_config(kind), dtype=torch.float32)
    with torch.no_grad():  # norms and biases default to 1 / 0: randomise them so the tests can fail
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0, 0.3)
    model.generation_config.eos_token_id = IM_END
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path
