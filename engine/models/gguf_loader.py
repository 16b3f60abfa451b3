"""GGUF files (llama.cpp's format): quantized tensors kept quantized (``--quantization gguf``, the default on
the CPU) for the types the kernels read, the others dequantised to full precision with the ``gguf`` package.

llama.cpp's converter permutes the rows of Q and K of ``llama`` models for its interleaved RoPE;
we undo that (on whole rows of blocks, when quantized) so the weights match the Hugging Face layout our
rotary embedding expects.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import transformers
from kubeinfer.engine.layers import quant_kernels
from kubeinfer.engine.layers.quantization import QuantizedRows, prepare_model, resolve_method
from kubeinfer.engine.models.config import ModelConfig
from kubeinfer.engine.models.dtype import resolve_dtype
from kubeinfer.engine.tokenizer import end_of_generation_ids, load_tokenizer
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubeinfer" / "gguf-tokenizers"

# GGUF general.architecture -> HF architecture
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _reader(path: Path):
    """A ``gguf.GGUFReader`` over a plain-ndarray view of its memory map: slicing ``np.memmap`` runs
    Python code per slice, which makes parsing a large vocabulary take seconds."""
    import gguf

    class _PlainArrayReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._data = value.view(np.ndarray)

    return _PlainArrayReader(path)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_model_config(reader, dtype: torch.dtype, eos_token_ids: list[int]) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    hidden = _field(reader, f"{arch}.embedding_length")
    heads = _field(reader, f"{arch}.attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch], vocab_size=vocab, hidden_size=hidden,
        num_layers=_field(reader, f"{arch}.block_count"), num_heads=heads,
        num_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", heads),
        head_dim=_field(reader, f"{arch}.attention.key_length") or hidden // heads,
        max_position_embeddings=_field(reader, f"{arch}.context_length"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_ids=eos_token_ids, dtype=dtype,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation of Q/K rows (interleaved → rotate-half RoPE layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(reader, cfg: ModelConfig, keep_quantized: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedRows]]:
    """Each tensor renamed to the Hugging Face name: with ``keep_quantized``, matrices in a type the kernels
    read as ``QuantizedRows`` (a copy of the file's blocks), everything else dequantised to float32."""
    from gguf.quants import dequantize

    permute = reader.fields["general.architecture"].contents() == "llama"
    dequantised: dict[str, int] = {}
    for tensor in reader.tensors:
        stem, kind = tensor.name.rsplit(".", 1)
        if match := _LAYER.match(tensor.name):
            layer, part, kind = match.groups()
            if part not in _LAYER_NAMES:
                raise ValueError(f"unexpected tensor {tensor.name!r} in GGUF file")
            name = f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
        elif stem in _GLOBAL_NAMES:
            part, name = stem, f"{_GLOBAL_NAMES[stem]}.{kind}"
        else:
            continue  # e.g. rope_freqs: recomputed from the config
        shape = tuple(reversed([int(d) for d in tensor.shape]))  # ggml lists dimensions fastest-first
        type_name = tensor.tensor_type.name
        heads = cfg.num_heads if part == "attn_q" else cfg.num_kv_heads
        if keep_quantized and len(shape) == 2 and type_name in quant_kernels.GGUF_TYPES:
            blocks = tensor.data.reshape(shape[0], -1)  # one row of blocks per output feature
            if permute and part in ("attn_q", "attn_k"):
                blocks = unpermute_qk(blocks, heads)
            yield name, QuantizedRows(quant_kernels.GGUF_TYPES[type_name], torch.from_numpy(np.array(blocks)),
                                      shape[1])
            continue
        if keep_quantized and type_name not in ("F32", "F16", "BF16"):
            dequantised[type_name] = dequantised.get(type_name, 0) + 1
        w = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if permute and part in ("attn_q", "attn_k"):
            w = unpermute_qk(w, heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        yield name, torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are read-only mmaps
    if dequantised:
        logger.info("GGUF tensors dequantised to full precision at load (no quantized kernel for the type): %s",
                    ", ".join(f"{count} x {name}" for name, count in sorted(dequantised.items())))


def gguf_tokenizer(path: Path, reader) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer and chat template. Converting it takes seconds, so the converted fast
    tokenizer is cached on disk, keyed by the file's path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    cache = _CACHE_ROOT / hashlib.sha256(key.encode()).hexdigest()[:20]
    if (cache / "tokenizer.json").is_file():
        with contextlib.suppress(ValueError):
            return load_tokenizer(cache)
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    if getattr(tokenizer, "chat_template", None) is None and "tokenizer.chat_template" in reader.fields:
        tokenizer.chat_template = _field(reader, "tokenizer.chat_template")
    with contextlib.suppress(OSError):  # a read-only home only costs the conversion next time
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_ensure_dir(_CACHE_ROOT)))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cache)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_gguf(path: str | Path, *, model_id: str, dtype: str | torch.dtype = "auto",
              device: torch.device | str = "cpu", tp_rank: int = 0, tp_size: int = 1,
              quantization: str | None = None):
    """A ``.gguf`` file → LoadedModel (tokenizer and chat template from the file). ``quantization``:
    ``gguf`` keeps the file's quantized tensors (the default on the CPU), ``int8`` requantises every linear
    layer to int8 rows, ``none`` dequantises everything."""
    from kubeinfer.engine.models.loader import LoadedModel, build_model

    path, device = Path(path), torch.device(device)
    try:
        reader = _reader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    tokenizer = gguf_tokenizer(path, reader)
    eos = end_of_generation_ids(tokenizer, _field(reader, "tokenizer.ggml.eos_token_id"),
                                _field(reader, "tokenizer.ggml.eot_token_id"),
                                _field(reader, "tokenizer.ggml.eom_token_id"))
    method = resolve_method(quantization, "gguf", device)
    cfg = gguf_model_config(reader, resolve_dtype(dtype, None, device, quantized=method != "none"), eos)
    model = build_model(cfg, device, tp_rank, tp_size)
    prepare_model(model, method)
    model.load_weights(iter_gguf_weights(reader, cfg, keep_quantized=method == "gguf"))
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, model_id=model_id, quantization=method)
