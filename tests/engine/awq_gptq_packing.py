"""Test-side AWQ and GPTQ packers, written from the documented layouts (not from the engine's unpacker),
and tiny 4-bit checkpoints built with them.

- AWQ (AutoAWQ GEMM): ``qweight int32 [K, N/8]``, ``qzeros int32 [K/g, N/8]``: word ``c`` holds the 8 output
  columns ``8c..8c+7``, column ``8c + ORDER[i]`` in bits ``4i..4i+3``, ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
- GPTQ: ``qweight int32 [K/8, N]``: word ``[i, n]`` holds inputs ``8i..8i+7`` of column ``n``, input
  ``8i + j`` in bits ``4j..4j+3``; ``qzeros int32 [K/g, N/8]``: column ``8c + j`` in bits ``4j..``, storing
  ``zero - 1`` in the v1 format (``zero`` in ``gptq_v2``); ``g_idx int32 [K] = k // g``.
- Both: ``scales fp16 [K/g, N]``; ``W[n, k] = (q[n, k] - z[k // g, n]) * s[k // g, n]``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tests.engine.tiny_models import make_tiny_checkpoint

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _words(nibbles: np.ndarray) -> np.ndarray:
    """``[..., 8]`` nibbles → int32 words, nibble ``i`` in bits ``4i..4i+3``."""
    words = np.zeros(nibbles.shape[:-1], dtype=np.uint32)
    for i in range(8):
        words |= (nibbles[..., i].astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return words.view(np.int32)


def pack_awq(q: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N, K]`` and ``z [G, N]`` → AWQ ``(qweight [K, N/8], qzeros [G, N/8])``."""

    def pack_columns(m: np.ndarray) -> np.ndarray:  # [R, N] -> [R, N/8]
        grouped = m.reshape(m.shape[0], -1, 8)  # [R, N/8, column within the word]
        return _words(grouped[..., AWQ_PACK_ORDER])  # nibble i holds column ORDER[i]

    return (torch.from_numpy(pack_columns(q.t().numpy())), torch.from_numpy(pack_columns(z.numpy())))


def pack_gptq(q: torch.Tensor, z: torch.Tensor, v1: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N, K]`` and ``z [G, N]`` → GPTQ ``(qweight [K/8, N], qzeros [G, N/8])``."""
    n, k = q.shape
    qw = _words(q.t().numpy().reshape(k // 8, 8, n).transpose(0, 2, 1))  # [K/8, N, input within the word]
    stored = z.numpy().astype(np.int64) - (1 if v1 else 0)
    qz = _words(stored.reshape(z.shape[0], -1, 8))
    return torch.from_numpy(qw), torch.from_numpy(qz)


def _per_input(t: torch.Tensor, k: int, group: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """``[G, N]`` per group → ``[N, K]`` per input, input ``k`` in group ``g_idx[k]`` (default ``k // group``)."""
    g = torch.arange(k) // group if g_idx is None else g_idx.long()
    return t.float()[g].t()


def dequantise(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, group: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 reference ``W[n, k] = (q[n, k] - z[g(k), n]) * s[g(k), n]``, ``g(k) = g_idx[k]`` or ``k // g``."""
    k = q.shape[1]
    return (q.float() - _per_input(z, k, group, g_idx)) * _per_input(s, k, group, g_idx)


def dequantise_q4_1(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, group: int,
                    g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """What Q4_1 blocks with ``d = s``, ``m = fp16(-s * z)`` hold: the reference with the min rounded."""
    k = q.shape[1]
    zk, sk = _per_input(z, k, group, g_idx), _per_input(s, k, group, g_idx)
    return q.float() * sk + (-(sk * zk)).half().float()


def quantise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of ``group`` inputs: ``(q [N, K] uint8, z [G, N] int, s [G, N] fp16)``;
    zeros kept in 1..15 so the GPTQ v1 format can store them."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-4).half()
    z = torch.round(-lo / s.float()).clamp(1, 15)
    q = torch.round(g / s.float()[..., None] + z[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, z.to(torch.int32).t().contiguous(), s.t().contiguous()


def make_int4_checkpoints(method: str, root: Path, group_size: int, kind: str = "llama", sym: bool = False,
                          v1: bool = True, min_rounded: bool = False, zero_biases: bool = False,
                          act_order: bool = False) -> tuple[Path, Path]:
    """A tiny ``kind`` checkpoint with its decoder linears ``method``-packed (``awq`` or ``gptq``), and the same
    model dense with those weights dequantised to float32 (``min_rounded``: as Q4_1 holds them, with
    ``-s * z`` rounded to fp16): ``(quantized dir, dense dir)``. ``zero_biases``: every packed linear also
    gets a zero ``.bias``, as some GPTQ checkpoints of bias-free models carry. ``act_order`` (GPTQ): each
    input is quantized in a random order, one per layer input as AutoGPTQ's Hessian order is (q/k/v share one,
    gate/up one), groups taken along it, ``g_idx[k]`` the group of input ``k``; qweight stays in input order."""
    base = make_tiny_checkpoint(kind, root / "base")
    quantized, dense = root / f"{method}-q", root / f"{method}-dense"
    shutil.copytree(base, quantized)
    shutil.copytree(base, dense)
    tensors = load_file(str(base / "model.safetensors"))
    packed, dequantised = {}, {}
    reference = dequantise_q4_1 if min_rounded else dequantise
    orders: dict[tuple[str, str], torch.Tensor] = {}
    gen = torch.Generator().manual_seed(7)
    for name, w in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
            packed[name] = dequantised[name] = w
            continue
        prefix = name.removesuffix(".weight")
        group = w.shape[1] if group_size == -1 else group_size
        layer, proj = prefix.split(".")[2], prefix.rsplit(".", 1)[1]
        source = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        key = (layer, source.get(proj, proj))
        if key not in orders:
            orders[key] = torch.randperm(w.shape[1], generator=gen) if act_order else torch.arange(w.shape[1])
        order = orders[key]
        position = torch.argsort(order)  # where each input falls in the quantization order
        wq = w[:, order]
        q, z, s = quantise(wq, group)
        if sym:
            z = torch.full_like(z, 8)
            q = torch.round(wq.float().reshape(w.shape[0], -1, group) / s.t().float()[..., None] + 8).clamp(0, 15)
            q = q.to(torch.uint8).reshape(w.shape)
        q = q[:, position].contiguous()  # back to input order
        g_idx = (position // group).to(torch.int32)
        dequantised[name] = reference(q, z, s, group, g_idx)
        if method == "awq":
            qweight, qzeros = pack_awq(q, z)
        else:
            qweight, qzeros = pack_gptq(q, z, v1=v1)
            packed[f"{prefix}.g_idx"] = g_idx
        packed |= {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": s}
        if zero_biases and f"{prefix}.bias" not in tensors:
            packed[f"{prefix}.bias"] = torch.zeros(w.shape[0], dtype=torch.float16)
    save_file(packed, str(quantized / "model.safetensors"))
    save_file(dequantised, str(dense / "model.safetensors"))
    config = json.loads((quantized / "config.json").read_text())
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym,
              "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    config["quantization_config"] = qc
    (quantized / "config.json").write_text(json.dumps(config))
    return quantized, dense
