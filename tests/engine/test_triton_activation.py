"""Fused Triton SiLU-and-mul vs ``ops.silu_and_mul_reference`` (``F.silu(gate) * up``, the model's MLP arithmetic).

On the CPU the kernel runs in Triton's interpreter (a spawned worker, see ``in_interpreter``); with a
CUDA GPU the same checks run compiled on it (``compiled_mode``).
Tolerances: the kernel rounds where torch does, so only exp() differs: fp32 1e-5, fp16 2e-3,
bf16 2e-2 (the interpreter also truncates fp32 -> bf16 where compiled Triton rounds to nearest).
"""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine.layers.ops import silu_and_mul_reference

from tests.engine.test_triton_attention import (
    compile_for_sm90,
    in_interpreter,
    interpreter_pool,
    kernel_device,
    requires_cuda,
    skip_unless_sm90_compiles,
)

MODULE = "kubeinfer.engine.layers.triton_activation"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield pool


def check_silu_and_mul(module, shape, dtype, sliced, device=None) -> None:
    device = device or kernel_device()
    gen = torch.Generator().manual_seed(sum(shape))
    width = shape[-1] + 6 if sliced else shape[-1]
    x = (torch.randn(*shape[:-1], width, generator=gen) * 4).to(dtype).to(device)
    if sliced:  # a non-contiguous view
        x = x[..., : shape[-1]]
    got = module.silu_and_mul(x)
    expected = silu_and_mul_reference(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize(
    "shape,sliced",
    [((5, 128), False), ((3, 2 * 1536), True), ((2, 2, 2 * 100), False), ((1, 2 * 3000), False)],
    ids=["small", "smollm_intermediate_sliced", "3d_odd_width", "multi_block"],
)
def test_matches_reference(interp, shape, sliced, dtype):
    in_interpreter(interp, check_silu_and_mul, shape, dtype, sliced, module=MODULE)


def check_errors_and_empty(module) -> None:
    device = kernel_device()
    with pytest.raises(ValueError, match="even"):
        module.silu_and_mul(torch.zeros(2, 7, device=device))
    assert module.silu_and_mul(torch.zeros(0, 8, device=device)).shape == (0, 4)


def test_bad_shapes_raise_clear_errors(interp):
    in_interpreter(interp, check_errors_and_empty, module=MODULE)


def test_compiles_for_h100():
    skip_unless_sm90_compiles()
    from kubeinfer.engine.layers import triton_activation

    args = dict(out_ptr=torch.bfloat16, x_ptr=torch.bfloat16, x_stride=2 * 14336, out_stride=14336, d=14336)
    compiled = compile_for_sm90(triton_activation._silu_and_mul_kernel, args, dict(BLOCK=1024), num_warps=4)
    assert "ld.global.v4" in compiled.asm["ptx"], "gate/up should load with 16-byte vectors"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("intermediate", [1536, 14336])
def test_cuda_matches_reference(intermediate, dtype):
    from kubeinfer.engine.layers import triton_activation

    check_silu_and_mul(triton_activation, (2048, 2 * intermediate), dtype, False, device="cuda")
    check_silu_and_mul(triton_activation, (3, 2 * intermediate), dtype, True, device="cuda")
