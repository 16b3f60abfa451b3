"""Packed int8 panels (engine/csrc/packed_panels.h): Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K rows repacked at load
for the int8 tiles.

The packed tiles do the int8 panel GEMM's arithmetic in the same order, so on every path this CPU runs their
results must equal the unpacked weights' int8 panels bit for bit, at every row count (one row included: the
unpacked one-row call is forced onto the panels for the comparison). The K-quants' packed panels also run
expanded (each panel decoded once for all rows, from some rows on): both ways are compared. Unpacking a packed row must give the
format's own blocks back (embedding lookups, dequantising), and what the kernels cannot do with packed rows
(float32 activations, partial panels) is refused.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.layers.quantization import QuantizedRows, QuantizedWeight

from tests.engine.test_quant_kernels import isa, quantized_weights, random_blocks  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build")

FORMATS = {"Q4_0": qk.Q4_0, "Q4_1": qk.Q4_1, "Q5_0": qk.Q5_0, "Q5_1": qk.Q5_1, "Q8_0": qk.Q8_0, "Q4_K": qk.Q4_K,
           "Q5_K": qk.Q5_K, "Q6_K": qk.Q6_K}
K_QUANTS = {qk.Q4_K, qk.Q5_K, qk.Q6_K}


def _weights(qtype: int, n: int, k: int, seed: int) -> torch.Tensor:
    """Rows quantized by the gguf package where it can (the K-quants it cannot: random valid blocks)."""
    if qtype in K_QUANTS:
        return torch.from_numpy(random_blocks(qtype, n, k, seed))
    return torch.from_numpy(quantized_weights(qtype, n, k, seed).copy())


def _packed_paths(qtype: int) -> list:
    """The packed paths of ``qtype``, each forced (a K-quant's tiles and expanded panels; else the tiles)."""
    if qtype not in K_QUANTS:
        return [contextlib.nullcontext()]
    return [qk.forced_packed_path(qtype, path) for path in qk.PACKED_PATHS]


def _needs_int8_tiles() -> None:
    if not qk.has_int8_panels():
        pytest.skip("the int8 tiles need AVX2 or better")


@pytest.mark.usefixtures("isa")  # every kernel path this CPU runs
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 33])
def test_packed_panels_multiply_as_the_int8_panels_bit_for_bit(name: str, m: int) -> None:
    _needs_int8_tiles()
    qtype = FORMATS[name]
    k = 768 if qtype in K_QUANTS else 576
    blocks = _weights(qtype, 96, k, seed=m)
    packed = qk.pack_panels(qtype, blocks, k)
    assert packed.shape == blocks.shape and not torch.equal(packed, blocks)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    with qk.forced_q8_path("panel"):
        expected = qk.matmul(x, qtype, blocks, k, activations="q8")
    for path in _packed_paths(qtype):
        with path:
            got = qk.matmul(x, qtype | qk.PACKED, packed, k)
            assert torch.equal(got, expected)
            out = torch.zeros(m, 200)  # a column slice of a wider output, as a fused layer's segment writes
            qk.matmul(x, qtype | qk.PACKED, packed, k, out=out.narrow(1, 40, 96))
            assert torch.equal(out[:, 40:136], expected) and not out[:, :40].any() and not out[:, 136:].any()


@pytest.mark.parametrize("name", list(FORMATS))
def test_packed_rows_unpack_to_their_blocks(name: str) -> None:
    qtype = FORMATS[name]
    k = {"Q8_0": 96, "Q4_K": 512, "Q5_K": 512, "Q6_K": 512}.get(name, 160)
    blocks = torch.from_numpy(random_blocks(qtype, 64, k, seed=3))
    packed = qk.pack_panels(qtype, blocks, k)
    assert torch.equal(qk.dequantize(qtype | qk.PACKED, packed, k), qk.dequantize(qtype, blocks, k))
    ids = torch.tensor([0, 31, 32, 63, 5, 40])
    expected, got = torch.empty(6, k), torch.empty(6, k)
    qk.embedding(qtype, blocks, k, None, ids, 0, expected, clear_outside=True)
    qk.embedding(qtype | qk.PACKED, packed, k, None, ids, 0, got, clear_outside=True)
    assert torch.equal(got, expected)


def test_what_packed_rows_cannot_do_is_refused() -> None:
    _needs_int8_tiles()
    blocks = torch.from_numpy(quantized_weights(qk.Q4_1, 64, 64, seed=0).copy())
    packed = qk.pack_panels(qk.Q4_1, blocks, 64)
    with pytest.raises(RuntimeError, match="matmul"):  # float32 activations: the packed tiles are int8 ones
        qk.matmul(torch.randn(2, 64), qk.Q4_1 | qk.PACKED, packed, 64, activations="f32")
    with pytest.raises(RuntimeError, match="pack_panels"):  # not a whole number of panels
        qk.pack_panels(qk.Q4_1, blocks[:40], 64)
    with pytest.raises(RuntimeError, match="pack_panels"):  # a format without a packed layout
        qk.pack_panels(qk.INT8_ROW, torch.zeros(32, 64, dtype=torch.int8), 64)
    with pytest.raises(ValueError, match="no expanded packed panels"):
        qk.set_packed_expand_min_rows(qk.Q4_1, 1)
    rows = QuantizedRows(qk.Q4_1, blocks, 64).packed_panels()
    assert rows.packed == qk.packs_panels(qk.Q4_1)
    if rows.packed:
        assert rows.narrow(0, 32, 32).packed
        with pytest.raises(ValueError, match="whole panels"):
            rows.narrow(0, 8, 16)
        with pytest.raises(ValueError, match="whole panels"):
            rows.narrow(1, 0, 32)


def test_a_weight_packs_its_segments_of_whole_panels() -> None:
    """A fused weight's segments pack one by one: those of whole panels, in a format the tiles take here."""
    _needs_int8_tiles()
    k = 64
    q = torch.from_numpy(quantized_weights(qk.Q4_1, 64, k, seed=1).copy())
    v = torch.from_numpy(quantized_weights(qk.Q4_0, 40, k, seed=2).copy())  # 40 rows: not whole panels
    weight = QuantizedWeight(rows=104, k=k)
    weight.put(0, QuantizedRows(qk.Q4_1, q, k))
    weight.put(64, QuantizedRows(qk.Q4_0, v, k))
    x = torch.randn(3, k)
    before = weight.matmul(x)
    weight.pack_panels()
    assert [part.packed for _, part in weight.segments] == [qk.packs_panels(qk.Q4_1), False]
    assert torch.equal(weight.matmul(x), before)  # (three rows: the int8 panels either way)


@pytest.mark.parametrize("main", ["Q4_K", "Q5_K"])
def test_a_k_m_style_weight_packs_its_k_quant_segments(main: str) -> None:
    """A fused weight as Ollama's Q4_K_M / Q5_K_M files hold them (Q4_K or Q5_K rows beside Q6_K ones, e.g. q/k
    and v): both pack; batches multiply as before, bit for bit, and one row stays within the int8 activations'
    error of float32."""
    _needs_int8_tiles()
    k, qtype = 512, FORMATS[main]
    q = torch.from_numpy(random_blocks(qtype, 64, k, seed=4))
    v = torch.from_numpy(random_blocks(qk.Q6_K, 32, k, seed=5))
    weight = QuantizedWeight(rows=96, k=k)
    weight.put(0, QuantizedRows(qtype, q, k))
    weight.put(64, QuantizedRows(qk.Q6_K, v, k))
    dense = torch.cat([qk.dequantize(qtype, q, k), qk.dequantize(qk.Q6_K, v, k)])
    batches = [torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) for rows in (3, 40)]
    before = [weight.matmul(x) for x in batches]
    weight.pack_panels()
    assert [part.packed for _, part in weight.segments] == [True, True]
    for x, expected in zip(batches, before, strict=True):
        assert torch.equal(weight.matmul(x), expected)
    one = torch.randn(1, k)
    reference = one @ dense.T
    assert (weight.matmul(one) - reference).abs().max() <= 0.02 * reference.abs().max()
    assert torch.equal(weight.embedding(torch.tensor([0, 70]), torch.float32), dense[[0, 70]])


# Each format's code bytes (and the K-quants' scale bytes): set to their largest values below
_CODE_BYTES = {qk.Q4_0: (2, 18, 0xFF), qk.Q4_1: (4, 20, 0xFF), qk.Q5_0: (2, 22, 0xFF), qk.Q5_1: (4, 24, 0xFF),
               qk.Q8_0: (2, 34, 0x7F), qk.Q4_K: (4, 144, 0xFF), qk.Q5_K: (4, 176, 0xFF), qk.Q6_K: (0, 208, 0xFF)}


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_packed_sums_hold_the_largest_codes_and_activations(name: str, sign: float) -> None:
    """Every code at its largest against activations all at +-127: AVX2's int16 pair sums must be widened before
    they overflow (random weights never come near it)."""
    _needs_int8_tiles()
    qtype = FORMATS[name]
    k = 512
    first, end, value = _CODE_BYTES[qtype]
    blocks = random_blocks(qtype, 32, k, seed=7)
    block_bytes = qk.BLOCKS[qtype][0]
    view = blocks.reshape(32, -1, block_bytes)
    view[:, :, first:end] = value
    blocks = torch.from_numpy(view.reshape(32, -1))
    x = torch.full((3, k), sign)
    reference = x.double() @ qk.dequantize(qtype, blocks, k).double().T
    for path in _packed_paths(qtype):
        with path:
            got = qk.matmul(x, qtype | qk.PACKED, qk.pack_panels(qtype, blocks, k), k).double()
        assert torch.allclose(got, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
