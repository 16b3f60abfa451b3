"""bfloat16 activations through the quantized CPU matmuls (the engine's bf16 dtype on quantized weights).

Two paths: below ``set_bf16_min_rows`` rows, or on a CPU without AVX-512 BF16 (any CPU: the path is capped to
prove it), x is widened to float32 and the float32 path runs, so the result is exactly that path's float32
result rounded to bf16. From the threshold on, where the CPU has AVX-512 BF16, the dequantised weights are
rounded to bf16 and multiplied with vdpbf16ps: checked against ``bf16(x) @ bf16(dequant(W))`` in float64,
within the bf16 rounding of the output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubeinfer.engine.layers import quant_kernels as qk

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType  # noqa: E402

# isa: each path without bf16 dot products that this CPU runs (avx512 is VNNI's), the kernel tests' fixture
from tests.engine.test_quant_kernels import K_FOR, isa, random_blocks  # noqa: E402, F401

pytestmark = pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build")
FORMATS = pytest.mark.parametrize("qtype", list(K_FOR), ids=lambda t: {v: n for n, v in qk.GGUF_TYPES.items()}[t])


def _inputs(qtype: int, m: int, n: int = 45, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    k = K_FOR[qtype]
    weights = random_blocks(qtype, n, k, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    dense = gguf_quants.dequantize(weights, GGMLQuantizationType(qtype)).reshape(n, k)
    return x, torch.from_numpy(weights), dense


@pytest.mark.usefixtures("isa")
@FORMATS
@pytest.mark.parametrize("m", [1, 3, 8, 40])
def test_widened_bf16_is_the_float32_result_rounded(qtype: int, m: int) -> None:
    x, weights, _ = _inputs(qtype, m, seed=m)
    k = K_FOR[qtype]
    got = qk.matmul(x, qtype, weights, k, activations="f32")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, qk.matmul(x.float(), qtype, weights, k, activations="f32").to(torch.bfloat16))


@pytest.fixture
def bf16_dot():
    """The bf16 dot products from 32 rows on, even where the engine leaves them off as the slower path."""
    if not qk.available() or not qk.has_bf16_dot():
        pytest.skip("this CPU has no AVX-512 BF16")
    previous = qk.set_bf16_min_rows(32)
    yield
    qk.set_bf16_min_rows(previous)


@FORMATS
@pytest.mark.parametrize("m", [32, 33, 40, 301])
def test_bf16_dot_products_match_the_bf16_reference(bf16_dot, qtype: int, m: int) -> None:
    x, weights, dense = _inputs(qtype, m, n=70, seed=m)  # 70 rows: two full 32-row panels and a partial one
    got = qk.matmul(x, qtype, weights, K_FOR[qtype], activations="f32").double()
    w16 = torch.from_numpy(dense).to(torch.bfloat16).double()
    reference = x.double() @ w16.T
    scale = reference.abs().max().item()
    # the output's bf16 rounding (2^-9 relative) and float32 accumulation in another order
    torch.testing.assert_close(got, reference, atol=4e-3 * scale, rtol=8e-3)


def test_bf16_dot_products_write_a_column_slice(bf16_dot) -> None:
    x, weights, _ = _inputs(qk.Q4_1, 36, n=37)
    wide = torch.full((36, 60), 7.0, dtype=torch.bfloat16)
    qk.matmul(x, qk.Q4_1, weights, K_FOR[qk.Q4_1], out=wide[:, 10:47], activations="f32")
    assert torch.equal(wide[:, 10:47], qk.matmul(x, qk.Q4_1, weights, K_FOR[qk.Q4_1], activations="f32"))
    assert (wide[:, :10] == 7).all() and (wide[:, 47:] == 7).all()


def test_bf16_threshold_moves_between_the_paths() -> None:
    x, weights, _ = _inputs(qk.Q8_0, 20)
    k = K_FOR[qk.Q8_0]
    previous = qk.set_bf16_min_rows(1 << 40)  # never: always widened
    try:
        widened = qk.matmul(x, qk.Q8_0, weights, k, activations="f32")
        assert torch.equal(widened, qk.matmul(x.float(), qk.Q8_0, weights, k, activations="f32").to(torch.bfloat16))
    finally:
        assert qk.set_bf16_min_rows(previous) == 1 << 40


@pytest.mark.parametrize("qtype", [qk.Q8_0, qk.Q4_1], ids=["Q8_0", "Q4_1"])
def test_bf16_embedding_is_the_float32_rows_rounded(qtype: int) -> None:
    k = K_FOR[qtype]
    weights = torch.from_numpy(random_blocks(qtype, 12, k, seed=3))
    ids = torch.tensor([3, 7, 11, 0])
    f32 = qk.embedding(qtype, weights, k, None, ids, 0, torch.empty(4, k), clear_outside=True)
    bf16 = qk.embedding(qtype, weights, k, None, ids, 0, torch.empty(4, k, dtype=torch.bfloat16), clear_outside=True)
    assert torch.equal(bf16, f32.to(torch.bfloat16))


@FORMATS
@pytest.mark.parametrize("m", [3, 40])
def test_bf16_with_int8_activations_is_the_int8_result_rounded(qtype: int, m: int) -> None:
    """int8 activations never take the bf16 dot products (whatever the threshold): x is widened, quantized."""
    x, weights, _ = _inputs(qtype, m, seed=m)
    k = K_FOR[qtype]
    previous = qk.set_bf16_min_rows(1)
    try:
        got = qk.matmul(x, qtype, weights, k, activations="q8")
    finally:
        qk.set_bf16_min_rows(previous)
    assert torch.equal(got, qk.matmul(x.float(), qtype, weights, k, activations="q8").to(torch.bfloat16))


def test_widened_bf16_keeps_infinities_and_nans() -> None:
    """The vectorised conversions round like torch, infinities and NaNs included (8 lanes and the tail)."""
    x, weights, _ = _inputs(qk.Q8_0, 3, n=45)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    k = K_FOR[qk.Q8_0]
    got = qk.matmul(x, qk.Q8_0, weights, k, activations="f32")
    want = qk.matmul(x.float(), qk.Q8_0, weights, k, activations="f32").to(torch.bfloat16)
    assert got[1].isinf().any() and got[2].isnan().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
