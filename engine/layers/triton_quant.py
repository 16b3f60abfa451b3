"""Quantized matmuls for the GPU in Triton, dequantising the weights inside the K loop.

Layouts (what loaders repack into; one 4-bit layout for GGUF Q4_0/Q4_1, AWQ and GPTQ):
- int8: ``qweight int8 [N, K]``, ``scales float32 [N]`` (per output channel): ``w = scale[n] * q``.
- 4-bit: ``qweight uint8 [N, K // 2]``, byte ``j`` of a row holding ``k = 2j`` (low nibble) and ``2j + 1``
  (high nibble); ``scales`` and ``mins`` ``[N, K // group]`` (float32 or float16): ``w = scale * q + min``.
  Q4_0 is ``min = -8 scale``, Q4_1 ``min = m``, AWQ/GPTQ ``min = -scale * zero``.
- fp8: ``torch._scaled_mm`` on e4m3 weights with per-channel scales (CUDA only).

Accumulation is fp32 (``tl.dot``); the output has the activations' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, x_stride, w_stride, out_stride,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * x_stride + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None] * w_stride + kk[None, :], mask=(cols[:, None] < N) & (kk[None, :] < K),
                    other=0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # |q| <= 127 is exact in fp16
    scale = tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _grouped_matmul_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, M, N, K, x_stride, w_stride, g_stride, out_stride,
                           GROUP: tl.constexpr, NIBBLES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One K step is one quantization group: its scale and min apply to the whole tile. ``NIBBLES``: two codes a
    byte (the 4-bit layout), else one (byte codes)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok, col_ok = rows[:, None] < M, cols[:, None] < N
    for g in range(0, K // GROUP):
        kk = g * GROUP + tl.arange(0, GROUP)
        if NIBBLES:
            half = tl.arange(0, GROUP // 2)
            packed = tl.load(w_ptr + cols[:, None] * w_stride + g * (GROUP // 2) + half[None, :], mask=col_ok,
                             other=0).to(tl.int32)
            q = tl.join(packed & 0xF, packed >> 4).reshape(BLOCK_N, GROUP)  # k = 2j, 2j + 1
        else:
            q = tl.load(w_ptr + cols[:, None] * w_stride + kk[None, :], mask=col_ok, other=0)
        scale = tl.load(s_ptr + cols * g_stride + g, mask=cols < N, other=0.0).to(tl.float32)
        low = tl.load(m_ptr + cols * g_stride + g, mask=cols < N, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * scale[:, None] + low[:, None]
        x = tl.load(x_ptr + rows[:, None] * x_stride + kk[None, :], mask=row_ok, other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok & (cols[None, :] < N))


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ (scales[:, None] * qweight).T`` for ``qweight int8 [N, K]``."""
    rows = _rows(x)
    n, k = qweight.shape
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0] and n:
        grid = (triton.cdiv(rows.shape[0], 16), triton.cdiv(n, 32))
        _int8_matmul_kernel[grid](rows, qweight, scales, out, rows.shape[0], n, k, rows.stride(0), qweight.stride(0),
                                  out.stride(0), BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    return out.view(*x.shape[:-1], n)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group: int = 32) -> torch.Tensor:
    """``x [..., K] @ W.T`` for ``W`` in the 4-bit layout above (``K`` a multiple of ``group``)."""
    return _grouped_matmul(x, qweight, qweight.shape[1] * 2, scales, mins, group, nibbles=True)


def int8_groups_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       group: int) -> torch.Tensor:
    """``x [..., K] @ W.T`` for ``W = scale * q + min`` per group of ``group`` weights, ``q`` the unsigned byte
    codes ``qweight uint8 [N, K]`` (every GGUF format that is not 4-bit, exactly: repack_gguf_groups)."""
    return _grouped_matmul(x, qweight, qweight.shape[1], scales, mins, group, nibbles=False)


def _grouped_matmul(x: torch.Tensor, qweight: torch.Tensor, k: int, scales: torch.Tensor, mins: torch.Tensor,
                    group: int, nibbles: bool) -> torch.Tensor:
    rows = _rows(x)
    n = qweight.shape[0]
    if k % group or scales.shape != (n, k // group) or mins.shape != scales.shape:
        what = "4-bit weights" if nibbles else "byte codes"
        raise ValueError(f"{what} of {n} x {k} need scales and mins of shape {(n, k // group)}")
    scales, mins = scales.contiguous(), mins.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0] and n:
        grid = (triton.cdiv(rows.shape[0], 16), triton.cdiv(n, 32))
        _grouped_matmul_kernel[grid](rows, qweight, scales, mins, out, rows.shape[0], n, k, rows.stride(0),
                                     qweight.stride(0), scales.stride(0), out.stride(0), GROUP=group,
                                     NIBBLES=nibbles, BLOCK_M=16, BLOCK_N=32)
    return out.view(*x.shape[:-1], n)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` values 0..15 -> the packed ``uint8 [N, K // 2]`` layout (k even: low nibble)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def fp8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights ``[N, K]`` and float32 per-channel scales ``[N]`` (max |w| -> 448)."""
    scales = weight.float().abs().amax(dim=1).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (weight.float() / scales[:, None]).to(torch.float8_e4m3fn), scales


def fp8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (scales * qweight).T`` through ``torch._scaled_mm`` (CUDA, sm_89+): activations quantized per row."""
    rows = _rows(x)
    x_scales = rows.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    xq = (rows.float() / x_scales).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, qweight.t(), scale_a=x_scales, scale_b=scales[None, :].float(), out_dtype=x.dtype)
    return out.view(*x.shape[:-1], qweight.shape[0])


def repack_gguf_q4(blocks: torch.Tensor, qtype: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 (type 2) / Q4_1 (type 3) rows ``uint8 [N, row_bytes]`` -> ``(qweight, scales, mins)`` of the 4-bit
    layout with groups of 32 (a GGUF block stores element i in the low nibble of byte i, element i + 16 in its
    high nibble)."""
    header = 2 if qtype == 2 else 4
    n = blocks.shape[0]
    b = blocks.reshape(n, k // 32, header + 16)
    d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    mins = -8.0 * d if qtype == 2 else b[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    qs = b[..., header:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)  # element order within each block
    return pack_int4(q), d.contiguous(), mins.contiguous()


def repack_gguf_q4_k(blocks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_K (type 12) rows ``uint8 [N, row_bytes]`` -> ``(qweight, scales, mins)`` of the 4-bit layout with
    groups of 32, exactly: each 256-weight block's eight sub-blocks have ``scale = d * sc`` and ``min = -dmin * m``
    (6-bit ``sc``, ``m``), kept in float32."""
    n = blocks.shape[0]
    scales, mins, codes = _k_blocks(blocks.reshape(n, k // 256, 144), 16)
    return pack_int4(codes.reshape(n, k)), scales.reshape(n, -1).contiguous(), mins.reshape(n, -1).contiguous()


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at:at + 2].contiguous().view(torch.float16).float()  # [..., 1]


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Bytes [..., 4] of 32 bits -> [..., 32]: bit i of the little-endian word, shifted up to bit 4."""
    bits = (qh.to(torch.int32)[..., :, None] >> torch.arange(8, dtype=torch.int32)) & 1
    return (bits.reshape(*qh.shape[:-1], 32) << 4).to(torch.uint8)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes [..., 12] -> the 6-bit scales and mins [..., 8] (ggml's get_scale_min_k4)."""
    s = s.to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def _k_blocks(b: torch.Tensor, qs_at: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K blocks ``[n, blocks, bytes]`` (their 128 nibble bytes at ``qs_at``) -> each sub-block's scale and
    min ``[n, blocks, 8]``, and its 4-bit codes ``[n, blocks, 8, 32]`` (sub-block j: nibble j % 2 of bytes
    32 (j // 2) ...)."""
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., qs_at:qs_at + 128].reshape(*b.shape[:2], 4, 32)  # [.., pair of sub-blocks, byte]
    codes = torch.stack([qs & 0xF, qs >> 4], dim=3).reshape(*b.shape[:2], 8, 32)
    return _f16(b, 0) * sc, -_f16(b, 2) * mn, codes


def repack_gguf_groups(blocks: torch.Tensor, qtype: int, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, int]:
    """GGUF Q8_0 (8), Q5_0 (6), Q5_1 (7), Q5_K (13) or Q6_K (14) rows ``uint8 [N, row_bytes]`` ->
    ``(qweight uint8 [N, K], scales, mins, group)`` for int8_groups_matmul: each weight's unsigned code, and per
    group (32 weights; Q6_K's 16) the scale and min its format decodes it with, exactly, in float32."""
    n = blocks.shape[0]
    if qtype == 8:  # Q8_0: d, 32 int8 codes (as unsigned: code + 128, min -128 d)
        b = blocks.reshape(n, k // 32, 34)
        d = _f16(b, 0).squeeze(-1)
        codes = (b[..., 2:].view(torch.int8).to(torch.int32) + 128).to(torch.uint8)
        return codes.reshape(n, k).contiguous(), d.contiguous(), (-128.0 * d).contiguous(), 32
    if qtype in (6, 7):  # Q5_0 (min -16 d) / Q5_1 (min m): nibbles and a 32-bit word of fifth bits
        head = 2 if qtype == 6 else 4
        b = blocks.reshape(n, k // 32, head + 20)
        d = _f16(b, 0).squeeze(-1)
        mins = -16.0 * d if qtype == 6 else _f16(b, 2).squeeze(-1)
        qs = b[..., head + 4:]
        codes = torch.cat([qs & 0xF, qs >> 4], dim=-1) | _fifth_bits(b[..., head:head + 4])
        return codes.reshape(n, k).contiguous(), d.contiguous(), mins.contiguous(), 32
    if qtype == 13:  # Q5_K: Q4_K's scales and nibbles, bit j of qh[i] above weight i of sub-block j
        b = blocks.reshape(n, k // 256, 176)
        scales, mins, low = _k_blocks(b, 48)
        high = ((b[..., 16:48].to(torch.int32)[..., None, :] >> torch.arange(8)[:, None]) & 1) << 4
        codes = low | high.to(torch.uint8)
        return codes.reshape(n, k).contiguous(), scales.reshape(n, -1).contiguous(), mins.reshape(n, -1).contiguous(), 32
    if qtype == 14:  # Q6_K: 6-bit codes (ql nibbles, qh pairs), an int8 scale per 16, min -32 scale
        b = blocks.reshape(n, k // 256, 210)
        ql = b[..., :128].reshape(n, -1, 2, 2, 32).to(torch.int32)  # [.., half, 32-byte run, l]
        qh = b[..., 128:192].reshape(n, -1, 2, 32).to(torch.int32)
        parts = [(ql[..., 0, :] & 0xF) | ((qh & 3) << 4), (ql[..., 1, :] & 0xF) | (((qh >> 2) & 3) << 4),
                 (ql[..., 0, :] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 1, :] >> 4) | (((qh >> 6) & 3) << 4)]
        codes = torch.stack(parts, dim=3).to(torch.uint8)  # [n, blocks, half, part, l]: weight 128 h + 32 p + l
        scales = _f16(b, 208) * b[..., 192:208].view(torch.int8).float()
        return codes.reshape(n, k).contiguous(), scales.reshape(n, -1).contiguous(), (-32.0 * scales).reshape(
            n, -1).contiguous(), 16
    raise ValueError(f"type {qtype} has no byte-code layout")
