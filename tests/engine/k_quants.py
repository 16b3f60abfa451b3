"""Q4_K / Q5_K / Q6_K blocks made in numpy (the gguf package dequantises these formats but cannot quantize them),
and the bundled GGUF rewritten with K-quant (and Q5_0 / Q5_1) tensors: a model as Ollama's Q4_K_M / Q5_K_M files
hold it.

The encoders are plain round-to-nearest (llama.cpp searches the scales harder); the layout is ggml's, checked
against ``gguf.quants.dequantize`` in the tests that use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def quantize_k(x: np.ndarray, five_bit: bool) -> np.ndarray:
    """Rows of ``x`` ([N, K], K a multiple of 256) as Q4_K (or Q5_K) blocks: uint8 [N, K / 256 * 144 (176)]."""
    levels = 31 if five_bit else 15
    subs = x.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(subs.min(-1), 0)
    scale, mins = (subs.max(-1) - low) / levels, -low
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    sc = np.clip(np.rint(_ratio(scale, d[:, None].astype(np.float32))), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_ratio(mins, dmin[:, None].astype(np.float32))), 0, 63).astype(np.uint8)
    step = d[:, None].astype(np.float32) * sc
    offset = dmin[:, None].astype(np.float32) * mn
    q = np.clip(np.rint(_ratio(subs + offset[..., None], np.broadcast_to(step[..., None], subs.shape))), 0, levels)
    q = q.astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)], axis=1)
    qs = ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).reshape(-1, 128)  # pairs of sub-blocks share 32 bytes
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales]
    if five_bit:
        parts.append(sum(((q[:, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ([N, K], K a multiple of 256) as Q6_K blocks: uint8 [N, K / 256 * 210]."""
    halves = x.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(halves).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16)
    sc = np.clip(np.rint(_ratio(scale, d[:, None].astype(np.float32))), -128, 127).astype(np.int8)
    step = d[:, None].astype(np.float32) * sc
    q = np.clip(np.rint(_ratio(halves, np.broadcast_to(step[..., None], halves.shape))), -32, 31) + 32
    v = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, 128-half, part, l]: weight 128 h + 32 part + l
    ql = np.concatenate([(v[:, :, 0] & 0xF) | ((v[:, :, 2] & 0xF) << 4),
                         (v[:, :, 1] & 0xF) | ((v[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = (sum((v[:, :, part] >> 4) << (2 * part) for part in range(4))).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1).reshape(x.shape[0], -1)


ENCODERS = {
    GGMLQuantizationType.Q4_K: lambda x: quantize_k(x, five_bit=False),
    GGMLQuantizationType.Q5_K: lambda x: quantize_k(x, five_bit=True),
    GGMLQuantizationType.Q6_K: quantize_q6_k,
    # (what llama.cpp's Q4_K_M / Q5_K_M put where a row is no whole number of 256-weight blocks)
    GGMLQuantizationType.Q5_0: lambda x: quantize(x, GGMLQuantizationType.Q5_0),
    GGMLQuantizationType.Q5_1: lambda x: quantize(x, GGMLQuantizationType.Q5_1),
    GGMLQuantizationType.F16: lambda x: x.astype(np.float16),  # (llama.cpp leaves some tensors in F16)
}


def k_quant_gguf(source: Path, destination: Path, types: dict[str, list[GGMLQuantizationType]]
                 ) -> dict[str, GGMLQuantizationType]:
    """``source`` rewritten to ``destination`` with the tensors of each part in ``types`` (e.g. ``ffn_down``)
    re-encoded from their dequantised values, layer i's as ``types[part][i % len(types[part])]``; returns the
    re-encoded tensors' types by name."""
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(destination, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    changed = {}
    for tensor in reader.tensors:
        name_parts = tensor.name.split(".")
        if name_parts[0] == "blk" and name_parts[2] in types:
            kinds = types[name_parts[2]]
            kind = kinds[int(name_parts[1]) % len(kinds)]
            dense = dequantize(tensor.data, tensor.tensor_type).reshape(-1, int(tensor.shape[0]))
            writer.add_tensor(tensor.name, ENCODERS[kind](dense), raw_dtype=kind)
            changed[tensor.name] = kind
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return changed
