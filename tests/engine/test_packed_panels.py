"""Packed int8 panels (engine/csrc/packed_panels.h): Q4_0/Q4_1/Q8_0 rows repacked at load for the int8 tiles.

The packed tiles do the int8 panel GEMM's arithmetic in the same order, so on every path this CPU runs their
results must equal the unpacked weights' int8 panels bit for bit, at every row count (one row included: the
unpacked one-row call is forced onto the panels for the comparison). Unpacking a packed row must give the
format's own blocks back (embedding lookups, dequantising), and what the kernels cannot do with packed rows
(float32 activations, partial panels) is refused.
"""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.layers.quantization import QuantizedRows, QuantizedWeight

from tests.engine.test_quant_kernels import isa, quantized_weights, random_blocks  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build")

FORMATS = {"Q4_0": qk.Q4_0, "Q4_1": qk.Q4_1, "Q8_0": qk.Q8_0}


def _needs_int8_tiles() -> None:
    if not qk.has_int8_panels():
        pytest.skip("the int8 tiles need AVX2 or better")


@pytest.mark.usefixtures("isa")  # every kernel path this CPU runs
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 33])
def test_packed_panels_multiply_as_the_int8_panels_bit_for_bit(name: str, m: int) -> None:
    _needs_int8_tiles()
    qtype, k = FORMATS[name], 576
    blocks = torch.from_numpy(quantized_weights(qtype, 96, k, seed=m).copy())
    packed = qk.pack_panels(qtype, blocks, k)
    assert packed.shape == blocks.shape and not torch.equal(packed, blocks)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    with qk.forced_q8_path("panel"):
        expected = qk.matmul(x, qtype, blocks, k, activations="q8")
    got = qk.matmul(x, qtype | qk.PACKED, packed, k)
    assert torch.equal(got, expected)
    out = torch.zeros(m, 200)  # a column slice of a wider output, as a fused layer's segment writes
    qk.matmul(x, qtype | qk.PACKED, packed, k, out=out.narrow(1, 40, 96))
    assert torch.equal(out[:, 40:136], expected) and not out[:, :40].any() and not out[:, 136:].any()


@pytest.mark.parametrize("name", list(FORMATS))
def test_packed_rows_unpack_to_their_blocks(name: str) -> None:
    qtype, k = FORMATS[name], 160 if name != "Q8_0" else 96
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
        qk.pack_panels(qk.Q6_K, torch.from_numpy(random_blocks(qk.Q6_K, 32, 256, seed=1)), 256)
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
