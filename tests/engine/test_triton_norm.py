"""Fused Triton RMSNorm(+residual) vs the plain-torch reference ``ops.rms_norm_reference`` and vs ``norm.RMSNorm``.

On the CPU the kernel runs in Triton's interpreter (a spawned worker, see ``in_interpreter``); with a
CUDA GPU the same checks run compiled on it (``compiled_mode``).
Tolerances: the kernel rounds exactly where torch does, so results differ only by the fp32
sum order and rsqrt: fp32 1e-5, fp16 2e-3, bf16 2e-2 (the two roundings may each land one ulp apart).
"""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine.layers.ops import rms_norm_reference

from tests.engine.test_triton_attention import (
    compile_for_sm90,
    in_interpreter,
    interpreter_pool,
    kernel_device,
    requires_cuda,
    skip_unless_sm90_compiles,
)

MODULE = "kubeinfer.engine.layers.triton_norm"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield pool


def check_rms_norm(module, shape, dtype, with_residual, sliced, device=None) -> None:
    device = device or kernel_device()
    gen = torch.Generator().manual_seed(sum(shape))
    hidden = shape[-1]
    x = (torch.randn(*shape[:-1], hidden + 8 if sliced else hidden, generator=gen) * 3).to(dtype).to(device)
    if sliced:  # a non-contiguous view, as after a split
        x = x[..., :hidden]
    residual = torch.randn(shape, generator=gen).to(dtype).to(device) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    got = module.rms_norm(x, weight, 1e-5, residual=residual)
    expected = rms_norm_reference(x, weight, 1e-5, residual=residual)
    tol = TOLERANCE[dtype]
    if residual is None:
        assert got.shape == x.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    else:
        # The sum is rounded like torch's: exact, except that the interpreter truncates fp32 -> bf16
        # (compiled Triton rounds to nearest even), which can leave it one bf16 ulp (<= 2^-7 relative) apart.
        sum_tol = 2**-7 if (dtype == torch.bfloat16 and x.device.type == "cpu") else 0.0
        torch.testing.assert_close(got[1], expected[1], atol=0, rtol=sum_tol)
        torch.testing.assert_close(got[0], expected[0], atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(
    "shape,sliced",
    [((5, 64), False), ((3, 576), True), ((2, 3, 96), False)],
    ids=["pow2", "smollm_hidden_sliced", "3d"],
)
def test_matches_reference(interp, shape, sliced, with_residual, dtype):
    in_interpreter(interp, check_rms_norm, shape, dtype, with_residual, sliced, module=MODULE)


def check_matches_model_rmsnorm(module) -> None:
    from kubeinfer.engine.layers.norm import RMSNorm

    device = kernel_device()
    norm = RMSNorm(576, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(576))
    x, residual = torch.randn(4, 576, device=device), torch.randn(4, 576, device=device)
    with torch.no_grad():
        torch.testing.assert_close(module.rms_norm(x, norm.weight, norm.eps), norm(x), atol=1e-5, rtol=1e-5)
        got, expected = module.rms_norm(x, norm.weight, norm.eps, residual), norm(x, residual)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_matches_model_rmsnorm(interp):
    in_interpreter(interp, check_matches_model_rmsnorm, module=MODULE)


def check_bad_shapes(module) -> None:
    on = {"device": kernel_device()}
    with pytest.raises(ValueError, match="weight"):
        module.rms_norm(torch.zeros(2, 8, **on), torch.ones(4, **on), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        module.rms_norm(torch.zeros(2, 8, **on), torch.ones(8, **on), 1e-5, residual=torch.zeros(3, 8, **on))
    assert module.rms_norm(torch.zeros(0, 8, **on), torch.ones(8, **on), 1e-5).shape == (0, 8)


def test_bad_shapes_raise_clear_errors(interp):
    in_interpreter(interp, check_bad_shapes, module=MODULE)


@pytest.mark.parametrize("hidden", [576, 4096, 8192])
def test_compiles_for_h100(hidden):
    skip_unless_sm90_compiles()
    import triton
    from kubeinfer.engine.layers import triton_norm

    block = triton.next_power_of_2(hidden)
    args = dict(
        out_ptr=torch.bfloat16,
        sum_ptr=torch.bfloat16,
        x_ptr=torch.bfloat16,
        residual_ptr=torch.bfloat16,
        weight_ptr=torch.bfloat16,
        x_stride=hidden,
        residual_stride=hidden,
        out_stride=hidden,
        sum_stride=hidden,
        hidden=hidden,
        eps=1e-5,
    )
    compiled = compile_for_sm90(
        triton_norm._rms_norm_kernel,
        args,
        dict(HAS_RESIDUAL=True, BLOCK=block),
        num_warps=min(16, max(1, block // 256)),
    )
    assert "ld.global" in compiled.asm["ptx"]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hidden", [576, 4096, 8192])
def test_cuda_matches_reference(hidden, dtype):
    from kubeinfer.engine.layers import triton_norm

    check_rms_norm(triton_norm, (2048, hidden), dtype, True, False, device="cuda")
    check_rms_norm(triton_norm, (7, hidden), dtype, False, True, device="cuda")
