"""Triton quantized matmuls (int8, the 4-bit layout, GGUF Q4 repacked into it) against the dequantised
float reference, in Triton's interpreter on the CPU (fp32 exact but for summation order, fp16) and compiled
on a GPU (``gpu`` marker); fp8 through ``torch._scaled_mm`` on the GPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.test_triton_attention import in_interpreter, interpreter_pool, requires_cuda

MODULE = "kubeinfer.engine.layers.triton_quant"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}
SHAPES = [(1, 64, 96), (7, 37, 160), (300, 45, 64)]  # (M, N, K): decode, odd rows, prefill


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield pool


def check_int8(module, m: int, n: int, k: int, dtype: torch.dtype, device: str = "cpu") -> None:
    gen = torch.Generator().manual_seed(m + n)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen) * 0.02 + 1e-3
    x = torch.randn(m, k, generator=gen)
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    got = module.int8_matmul(x.to(dtype).to(device), q.to(device), scales.to(device)).double().cpu()
    tol = TOLERANCE[dtype] * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=TOLERANCE[dtype])


def check_int4(module, m: int, n: int, k: int, dtype: torch.dtype, device: str = "cpu") -> None:
    gen = torch.Generator().manual_seed(m * n)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (n, k // 32), generator=gen).float()  # AWQ/GPTQ-style zero points
    mins = -scales * zeros
    x = torch.randn(m, k, generator=gen)
    w = q.double() * scales.double().repeat_interleave(32, 1) + mins.double().repeat_interleave(32, 1)
    want = x.double() @ w.T
    got = module.int4_matmul(x.to(dtype).to(device), module.pack_int4(q).to(device), scales.to(device),
                             mins.to(device)).double().cpu()
    tol = TOLERANCE[dtype] * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=TOLERANCE[dtype])


def check_gguf_q4(module, qtype: int, device: str = "cpu") -> None:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(qtype)
    blocks = quantize(rng.standard_normal((40, 128)).astype(np.float32), GGMLQuantizationType(qtype))
    reference = torch.from_numpy(dequantize(blocks, GGMLQuantizationType(qtype))).double()
    qweight, scales, mins = module.repack_gguf_q4(torch.from_numpy(blocks), qtype, 128)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(qtype))
    got = module.int4_matmul(x.to(device), qweight.to(device), scales.to(device), mins.to(device)).double().cpu()
    want = x.double() @ reference.T
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)


def check_gguf_q4_k(module, device: str = "cpu") -> None:
    """Q4_K blocks (as llama.cpp lays them out: tests/engine/k_quants.py) repacked exactly into the 4-bit layout."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    from tests.engine.k_quants import quantize_k

    blocks = quantize_k(np.random.default_rng(12).standard_normal((40, 512)).astype(np.float32), five_bit=False)
    reference = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_K)).double()
    qweight, scales, mins = module.repack_gguf_q4_k(torch.from_numpy(blocks), 512)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(12))
    got = module.int4_matmul(x.to(device), qweight.to(device), scales.to(device), mins.to(device)).double().cpu()
    want = x.double() @ reference.T
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)


def check_gguf_groups(module, device: str = "cpu") -> None:
    """Q8_0 / Q5_0 / Q5_1 (the gguf package's quantizer) and Q5_K / Q6_K blocks (llama.cpp's layout:
    tests/engine/k_quants.py) as byte codes with group scales, against gguf's dequantised values."""
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from tests.engine.k_quants import quantize_k, quantize_q6_k

    dense = np.random.default_rng(7).standard_normal((40, 512)).astype(np.float32)
    encoders = {T.Q8_0: lambda w: quantize(w, T.Q8_0), T.Q5_0: lambda w: quantize(w, T.Q5_0),
                T.Q5_1: lambda w: quantize(w, T.Q5_1), T.Q5_K: lambda w: quantize_k(w, five_bit=True),
                T.Q6_K: quantize_q6_k}
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(7))
    for kind, encode in encoders.items():
        blocks = encode(dense)
        reference = torch.from_numpy(dequantize(blocks, kind)).double()
        qweight, scales, mins, group = module.repack_gguf_groups(torch.from_numpy(blocks), kind.value, 512)
        got = module.int8_groups_matmul(x.to(device), qweight.to(device), scales.to(device), mins.to(device),
                                        group).double().cpu()
        want = x.double() @ reference.T
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["decode", "odd", "prefill"])
def test_int8_matches_reference(interp, shape, dtype) -> None:
    in_interpreter(interp, check_int8, *shape, dtype, module=MODULE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["decode", "odd", "prefill"])
def test_int4_matches_reference(interp, shape, dtype) -> None:
    in_interpreter(interp, check_int4, *shape, dtype, module=MODULE)


@pytest.mark.parametrize("qtype", [2, 3], ids=["Q4_0", "Q4_1"])
def test_gguf_q4_repacked_matches_gguf_dequantize(interp, qtype: int) -> None:
    in_interpreter(interp, check_gguf_q4, qtype, module=MODULE)


def test_gguf_q4_k_repacked_matches_gguf_dequantize(interp) -> None:
    in_interpreter(interp, check_gguf_q4_k, module=MODULE)


def test_other_gguf_types_as_byte_codes_match_gguf_dequantize(interp) -> None:
    in_interpreter(interp, check_gguf_groups, module=MODULE)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (333, 1000, 2048)])
def test_cuda_matches_reference(shape) -> None:
    from kubeinfer.engine.layers import triton_quant

    check_int8(triton_quant, *shape, torch.float16, device="cuda")
    check_int4(triton_quant, *shape, torch.float16, device="cuda")
    check_gguf_q4(triton_quant, 3, device="cuda")
    check_gguf_q4_k(triton_quant, device="cuda")
    check_gguf_groups(triton_quant, device="cuda")


@pytest.mark.gpu
@requires_cuda
def test_fp8_scaled_mm_close_to_reference() -> None:
    from kubeinfer.engine.layers import triton_quant

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need sm_89 or newer")
    w = torch.randn(512, 1024, device="cuda") * 0.05
    x = torch.randn(17, 1024, device="cuda", dtype=torch.bfloat16)
    qweight, scales = triton_quant.fp8_quantize(w)
    got = triton_quant.fp8_matmul(x, qweight, scales).float()
    want = x.float() @ w.T
    assert (got - want).norm() < 0.05 * want.norm()
