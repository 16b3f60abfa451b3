"""The quantized CPU matmuls against the dequantised float reference, on every path this CPU runs.

Weights are random GGUF blocks (random bytes with sane fp16 scales; for Q8_0/Q4_0/Q4_1 also real weights
quantized by the ``gguf`` package's own ``gguf.quants.quantize``), dequantised by ``gguf.quants.dequantize``.
In ``f32`` mode (weights dequantised in registers, or a panel of rows at a time for the tiled GEMM, narrow
or wide; each is forced at every row count) the result must equal ``dequant(W) @ x`` up to float32
rounding. In ``q8`` mode the kernels quantize the activations to int8 per block of 32 as llama.cpp does,
so the result is checked tightly against ``dequant(W) @ q8(x)`` (the same arithmetic in float64: catches
any decoding or indexing bug) and loosely against the plain reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubeinfer.engine.layers import quant_kernels as qk

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType  # noqa: E402

pytestmark = pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build")

ISAS = ["scalar", "avx2", "avx512"]
_ISA_RANK = {"scalar": 0, "avx2": 1, "avx512_vnni": 2, "avx512": 2, "avx512_bf16": 3}
# where each format keeps its fp16 scales: (byte offset, low, high) of sane magnitudes
_HALF_FIELDS = {
    qk.Q8_0: [(0, 1e-3, 2e-2)], qk.Q4_0: [(0, 1e-3, 3e-2)], qk.Q4_1: [(0, 1e-3, 3e-2), (2, -0.2, 0.2)],
    qk.Q5_0: [(0, 1e-3, 2e-2)], qk.Q5_1: [(0, 1e-3, 2e-2), (2, -0.2, 0.2)],
    qk.Q4_K: [(0, 1e-4, 2e-3), (2, 1e-4, 2e-3)], qk.Q5_K: [(0, 1e-4, 1e-3), (2, 1e-4, 1e-3)],
    qk.Q6_K: [(208, 1e-4, 1e-3)],
}
K_FOR = {qk.Q8_0: 96, qk.Q4_0: 160, qk.Q4_1: 576, qk.Q5_0: 160, qk.Q5_1: 576, qk.Q4_K: 512, qk.Q5_K: 256,
         qk.Q6_K: 512}
ROWS = [1, 2, 3, 4, 5, 7, 8, 333]  # decode rows 1-8 (and odd), prefill 300+


def _runs(isa: str) -> bool:
    return _ISA_RANK[qk.supported_isa()] >= _ISA_RANK[isa]


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest):
    if not _runs(request.param):
        pytest.skip(f"this CPU has no {request.param} (best: {qk.supported_isa()})")
    previous = qk.current_isa()
    assert qk.set_isa(request.param) == {"avx512": "avx512_vnni"}.get(request.param, request.param)
    yield request.param
    qk.set_isa(previous)


def random_blocks(qtype: int, n: int, k: int, seed: int) -> np.ndarray:
    """``n`` rows of random valid blocks: random bits, with every fp16 scale field set to a sane value."""
    rng = np.random.default_rng(seed)
    block_bytes, block_elems = qk.BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(n, k // block_elems, block_bytes), dtype=np.uint8)
    for offset, low, high in _HALF_FIELDS[qtype]:
        halves = rng.uniform(low, high, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = halves.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(n, -1)


def quantized_weights(qtype: int, n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return gguf_quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, GGMLQuantizationType(qtype))


def q8_activations(x: np.ndarray) -> np.ndarray:
    """What the kernels compute with: x quantized to int8 per block of 32 (scale max|x| / 127), dequantised."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(127) / np.maximum(np.abs(blocks).max(axis=-1, keepdims=True), 1e-30), 0)
    q = np.round(blocks * inv.astype(np.float32))
    return (q * d).reshape(x.shape).astype(np.float64)


@pytest.fixture(params=[*(f"f32-{path}" for path in qk.F32_PATHS), *(f"q8-{path}" for path in qk.Q8_PATHS)])
def mode(request: pytest.FixtureRequest):
    """The activation mode, once per path, each forced at every row count (the kernels pick between them by
    rows): float32 decoded in registers, the panel GEMM's dot-product tiles, its wide k-major panels; int8
    in 4-row dot products or the int8 panel GEMM (AVX2 or AVX-512 VNNI: on the scalar path the rows run)."""
    activations, path = request.param.split("-")
    forced = qk.forced_path(path) if activations == "f32" else qk.forced_q8_path(path)
    with forced:
        yield activations


def check(qtype: int, weights: np.ndarray, k: int, m: int, seed: int, mode: str) -> None:
    reference_w = gguf_quants.dequantize(weights, GGMLQuantizationType(qtype)).reshape(weights.shape[0], k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    got = qk.matmul(x, qtype, torch.from_numpy(weights), k, activations=mode).double().numpy()
    plain = x.double().numpy() @ reference_w.astype(np.float64).T
    scale = np.abs(plain).max() + 1e-12
    if mode == "f32":
        np.testing.assert_allclose(got, plain, atol=1e-5 * scale, rtol=1e-5)
        return
    same_arithmetic = q8_activations(x.numpy()) @ reference_w.astype(np.float64).T
    np.testing.assert_allclose(got, same_arithmetic, atol=2e-5 * scale, rtol=1e-4)
    assert np.linalg.norm(got - plain) <= 0.02 * np.linalg.norm(plain)


@pytest.mark.parametrize("qtype", list(K_FOR), ids=lambda t: {v: n for n, v in qk.GGUF_TYPES.items()}[t])
@pytest.mark.parametrize("m", ROWS)
def test_random_blocks_match_dequantised_reference(isa: str, mode: str, qtype: int, m: int) -> None:
    k = K_FOR[qtype]
    check(qtype, random_blocks(qtype, 37, k, seed=m), k, m, seed=100 + m, mode=mode)


@pytest.mark.parametrize("qtype", [qk.Q8_0, qk.Q4_0, qk.Q4_1], ids=["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 6, 301])
def test_gguf_quantized_weights_match_dequantised_reference(isa: str, mode: str, qtype: int, m: int) -> None:
    check(qtype, quantized_weights(qtype, 300, 576, seed=m), 576, m, seed=m, mode=mode)


@pytest.mark.parametrize("qtype", list(K_FOR), ids=lambda t: {v: n for n, v in qk.GGUF_TYPES.items()}[t])
def test_dequantize_rows_is_gguf_dequantize(qtype: int) -> None:
    k = K_FOR[qtype]
    weights = random_blocks(qtype, 5, k, seed=qtype)
    expected = gguf_quants.dequantize(weights, GGMLQuantizationType(qtype)).reshape(5, k)
    got = qk.dequantize(qtype, torch.from_numpy(weights), k).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", [qk.Q8_0, qk.Q4_1, qk.Q6_K], ids=["Q8_0", "Q4_1", "Q6_K"])
def test_embedding_reads_the_rows_of_each_range_and_clears_the_rest(qtype: int) -> None:
    """Two row ranges of one table, as QuantizedWeight keeps them: the first call clears the ids outside its
    range, the second fills its own and leaves the first's rows alone."""
    k = K_FOR[qtype]
    weights = random_blocks(qtype, 12, k, seed=7)
    table = gguf_quants.dequantize(weights, GGMLQuantizationType(qtype)).reshape(12, k)
    low, high = torch.from_numpy(weights[:5].copy()), torch.from_numpy(weights[5:10].copy())  # rows 10, 11: none
    ids = torch.tensor([3, 7, 11, 0, 9, 5, 4])
    out = torch.full((len(ids), k), float("nan"))
    qk.embedding(qtype, low, k, None, ids, 0, out, clear_outside=True)
    qk.embedding(qtype, high, k, None, ids, 5, out, clear_outside=False)
    expected = np.stack([table[i] if i < 10 else np.zeros(k, np.float32) for i in ids.tolist()])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="int64"):
        qk.embedding(qtype, low, k, None, ids.int(), 0, out, clear_outside=True)


def filled_blocks(qtype: int, n: int, k: int, byte: int, seed: int) -> np.ndarray:
    """``n`` rows of blocks whose every byte is ``byte`` except the fp16 scale fields (sane values, as above)."""
    block_bytes, block_elems = qk.BLOCKS[qtype]
    blocks = np.full((n, k // block_elems, block_bytes), byte, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for offset, low, high in _HALF_FIELDS[qtype]:
        halves = rng.uniform(low, high, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = halves.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("q8_path", list(qk.Q8_PATHS))
@pytest.mark.parametrize("byte", [0xFF, 0x7F, 0x80])
@pytest.mark.parametrize("qtype", list(K_FOR), ids=lambda t: {v: n for n, v in qk.GGUF_TYPES.items()}[t])
def test_int8_sums_at_their_largest_do_not_overflow(isa: str, q8_path: str, qtype: int, byte: int) -> None:
    """Every code at an extreme (all bytes 0xFF: the largest unsigned codes; 0x7F / 0x80: Q8_0's largest and
    most negative) meets activations whose blocks quantize to +-127 everywhere: the largest integer sums the
    int8 paths form (AVX2 adds several vpmaddubsw results as int16 before widening). Exact up to float32."""
    k = K_FOR[qtype]
    weights = filled_blocks(qtype, 37, k, byte, seed=byte)
    reference_w = gguf_quants.dequantize(weights, GGMLQuantizationType(qtype)).reshape(37, k).astype(np.float64)
    x = torch.ones(5, k) * torch.tensor([1.0, -1.0, 2.5, -0.5, 3.0])[:, None]  # every q = +-127
    with qk.forced_q8_path(q8_path):
        got = qk.matmul(x, qtype, torch.from_numpy(weights), k, activations="q8").double().numpy()
    expected = x.double().numpy() @ reference_w.T
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=1e-5)


@pytest.mark.parametrize("q8_path", list(qk.Q8_PATHS))
@pytest.mark.parametrize("value", [127, -128])
def test_int8_row_sums_at_their_largest_do_not_overflow(isa: str, q8_path: str, value: int) -> None:
    q = torch.full((37, 192), value, dtype=torch.int8)
    scales = torch.full((37,), 1e-3)
    x = torch.ones(5, 192) * torch.tensor([1.0, -1.0, 2.5, -0.5, 3.0])[:, None]
    with qk.forced_q8_path(q8_path):
        got = qk.matmul(x, qk.INT8_ROW, q, 192, scales, activations="q8").double()
    expected = x.double() @ (q.double() * 1e-3).T
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("m", [1, 4, 9, 300])
def test_int8_rows_match_reference(isa: str, mode: str, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    q = torch.randint(-127, 128, (45, 192), dtype=torch.int8, generator=gen)
    scales = torch.rand(45, generator=gen) * 0.01 + 1e-3
    x = torch.randn(m, 192, generator=gen)
    reference_w = q.double() * scales.double()[:, None]
    got = qk.matmul(x, qk.INT8_ROW, q, 192, scales, activations=mode).double()
    x_used = x.double() if mode == "f32" else torch.from_numpy(q8_activations(x.numpy()))
    same_arithmetic = x_used @ reference_w.T
    torch.testing.assert_close(got, same_arithmetic, atol=2e-5 * same_arithmetic.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(qk.dequantize(qk.INT8_ROW, q, 192, scales).double(), reference_w)


def test_output_slice_and_empty_batch(isa: str, mode: str) -> None:
    """The kernel writes a column slice of a wider output (fused projections of mixed types) and takes M = 0."""
    weights = torch.from_numpy(random_blocks(qk.Q4_1, 17, 64, seed=1))
    x = torch.randn(3, 64)
    wide = torch.full((3, 40), 7.0)
    qk.matmul(x, qk.Q4_1, weights, 64, out=wide[:, 20:37], activations=mode)
    torch.testing.assert_close(wide[:, 20:37], qk.matmul(x, qk.Q4_1, weights, 64, activations=mode))
    assert (wide[:, :20] == 7).all() and (wide[:, 37:] == 7).all()
    assert qk.matmul(torch.empty(0, 64), qk.Q4_1, weights, 64).shape == (0, 17)


def test_bad_arguments_are_rejected() -> None:
    weights = torch.from_numpy(random_blocks(qk.Q4_K, 3, 256, seed=2))
    with pytest.raises(RuntimeError):
        qk.matmul(torch.randn(1, 32), qk.Q4_K, weights, 32)  # not a whole super-block
    with pytest.raises(ValueError):
        qk.row_bytes(qk.Q4_K, 100)


def test_isa_is_capped_by_the_cpu() -> None:
    best = qk.supported_isa()
    previous = qk.current_isa()
    try:
        assert qk.set_isa("avx512_bf16") == best
        assert qk.set_isa("avx512") == {"avx512_bf16": "avx512_vnni"}.get(best, best)
        assert qk.set_isa("scalar") == "scalar"
    finally:
        qk.set_isa(previous)
