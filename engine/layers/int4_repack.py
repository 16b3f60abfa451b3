"""4-bit group-quantized weights (AWQ, GPTQ) unpacked and repacked as GGUF Q4_1 rows for the CPU kernels.

Both formats store ``W[n, k] = (q[n, k] - z[g(k), n]) * s[g(k), n]`` with 4-bit ``q``, 4-bit zeros and fp16
scales per group of ``group_size`` input features; they differ only in how the nibbles are packed into
int32 words:

- AWQ (AutoAWQ's GEMM version): ``qweight [K, N/8]`` and ``qzeros [K/g, N/8]`` packed along the *output*
  dim, nibble ``i`` of word ``c`` holding column ``8c + AWQ_ORDER[i]`` (AutoAWQ's ``[0, 2, 4, 6, 1, 3, 5, 7]``).
- GPTQ: ``qweight [K/8, N]`` packed along the *input* dim (nibble ``j`` of word ``i`` is input ``8i + j``,
  low nibble first); ``qzeros [K/g, N/8]`` packed along the output dim in plain order.

A Q4_1 block is 32 weights ``d * q + m`` (fp16 ``d``, fp16 ``m``, 16 bytes of nibbles: byte ``j`` holds
element ``j`` low and ``j + 16`` high). With ``d = s`` and ``m = -s * z`` a group of 32·r inputs becomes r
blocks sharing one scale and min, so the nibbles are kept bit for bit and the scales exactly; only ``m``
is rounded to fp16 (at most 2^-11 |s·z| per weight; AutoAWQ's own fp16 kernels round ``s·z`` likewise).
Every block carries its own scale, so a tensor-parallel split of the inputs needs only 32-aligned shards,
not group-aligned ones. No dense copy is made: rows are repacked in chunks through uint8 nibbles.
"""

from __future__ import annotations

import torch
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.layers.quantization import QuantizedRows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_CHUNK = 2048  # output rows repacked at a time: bounds the uint8/int32 temporaries
_BLOCK = 32


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``int32 [..., W]`` → ``uint8 [..., W, 8]``: nibble ``i`` (bits 4i..4i+3) of each word."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ ``int32 [R, N/8]`` (qweight or qzeros) → ``uint8 [R, N]`` in column order."""
    nib = _nibbles(packed)  # [R, N/8, 8]: nibble i holds column AWQ_ORDER[i]
    inverse = [AWQ_ORDER.index(j) for j in range(8)]
    return nib[..., inverse].reshape(packed.shape[0], -1)


def unpack_gptq_weight(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight ``int32 [K/8, N]`` → ``uint8 [N, K]`` (output rows, as the kernels store them)."""
    nib = _nibbles(packed)  # [K/8, N, 8]: nibble j of word i is input 8i + j
    return nib.permute(1, 0, 2).reshape(packed.shape[1], -1)


def unpack_gptq_zeros(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qzeros ``int32 [G, N/8]`` → ``uint8 [G, N]`` (nibble j of word c is column 8c + j)."""
    return _nibbles(packed).reshape(packed.shape[0], -1)


def group_size_for(group_size: int, k: int) -> int:
    """The effective group of ``k`` inputs (-1: all of them), checked against the 32-element Q4_1 block."""
    g = k if group_size == -1 else group_size
    if g <= 0 or g % _BLOCK or k % g:
        raise ValueError(f"group size {group_size} over {k} input features: the CPU kernels need groups of a "
                         f"multiple of {_BLOCK} that divide the input features")
    return g


def q4_1_rows(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> QuantizedRows:
    """Q4_1 rows of ``W[n, k] = (q[n, k] - zeros[k // group, n]) * scales[k // group, n]``.

    ``q``: ``uint8 [N, K]`` nibbles; ``zeros``: ``[K/group, N]`` (any numeric dtype: a v1 GPTQ zero of 16 is
    fine, ``m`` is a float); ``scales``: ``[K/group, N]`` (fp16 in the checkpoints)."""
    n, k = q.shape
    if k % group or group % _BLOCK or zeros.shape != (k // group, n) or scales.shape != zeros.shape:
        raise ValueError(f"int4 weight [{n}, {k}] with zeros {tuple(zeros.shape)}, scales {tuple(scales.shape)} "
                         f"and group {group}: inconsistent shapes")
    per_group = group // _BLOCK
    d = scales.to(torch.float16)
    m = (-(d.float() * zeros.float())).to(torch.float16)
    d, m = d.t().repeat_interleave(per_group, 1), m.t().repeat_interleave(per_group, 1)  # [N, K/32]
    nblocks = k // _BLOCK
    out = torch.empty(n, nblocks, qk.BLOCKS[qk.Q4_1][0], dtype=torch.uint8)
    out[..., 0:2] = d.contiguous().view(torch.uint8).view(n, nblocks, 2)
    out[..., 2:4] = m.contiguous().view(torch.uint8).view(n, nblocks, 2)
    blocks = q.view(n, nblocks, _BLOCK)
    out[..., 4:] = blocks[..., :16] | (blocks[..., 16:] << 4)
    return QuantizedRows(qk.Q4_1, out.view(n, -1), k)


def _stack(parts: list[QuantizedRows], k: int) -> QuantizedRows:
    return parts[0] if len(parts) == 1 else QuantizedRows(qk.Q4_1, torch.cat([p.data for p in parts]), k)


def awq_to_q4_1(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
                ) -> QuantizedRows:
    """An AWQ GEMM linear (``qweight [K, N/8]``, ``qzeros [K/g, N/8]``, ``scales [K/g, N]``) as Q4_1 rows."""
    k, words = qweight.shape
    group = group_size_for(group_size, k)
    if qzeros.shape != (k // group, words) or scales.shape != (k // group, 8 * words):
        raise ValueError(f"AWQ qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} do not fit group size {group_size}")
    parts = []
    for w0 in range(0, words, _CHUNK // 8):
        w1 = min(words, w0 + _CHUNK // 8)
        q = unpack_awq(qweight[:, w0:w1]).t().contiguous()
        parts.append(q4_1_rows(q, unpack_awq(qzeros[:, w0:w1]), scales[:, 8 * w0:8 * w1], group))
    return _stack(parts, k)


def gptq_to_q4_1(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor, group_size: int,
                 zero_offset: int, fixed_zero: int | None = None, perm: torch.Tensor | None = None
                 ) -> QuantizedRows:
    """A GPTQ 4-bit linear (``qweight [K/8, N]``, ``qzeros [K/g, N/8]``, ``scales [K/g, N]``) as Q4_1 rows.
    ``zero_offset``: 1 for the v1 format (stored zero = zero - 1), 0 for ``gptq_v2``; ``fixed_zero``: the
    zero of a symmetric checkpoint (8), used instead of qzeros. ``perm`` (act-order): the input order that
    makes the groups contiguous (``g_idx[perm] == k // group``); the rows hold the inputs in that order."""
    words, n = qweight.shape
    k = 8 * words
    group = group_size_for(group_size, k)
    if scales.shape != (k // group, n) or (fixed_zero is None and (qzeros is None or
                                                                   qzeros.shape != (k // group, -(-n // 8)))):
        raise ValueError(f"GPTQ qweight {tuple(qweight.shape)}, qzeros "
                         f"{None if qzeros is None else tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not "
                         f"fit group size {group_size}")
    parts = []
    for n0 in range(0, n, _CHUNK):
        n1 = min(n, n0 + _CHUNK)
        q = unpack_gptq_weight(qweight[:, n0:n1])
        if perm is not None:
            q = q.index_select(1, perm)
        if fixed_zero is None:
            zeros = unpack_gptq_zeros(qzeros[:, n0 // 8:-(-n1 // 8)])[:, :n1 - n0].to(torch.int16) + zero_offset
        else:
            zeros = torch.full((k // group, n1 - n0), fixed_zero, dtype=torch.int16)
        parts.append(q4_1_rows(q, zeros, scales[:, n0:n1], group))
    rows = _stack(parts, k)
    return rows if perm is None else QuantizedRows(rows.qtype, rows.data, k, perm=perm)
