"""A K-quant GGUF end to end: the bundled model rewritten as Ollama's Q4_K_M / Q5_K_M files mix their types: the
down projections (1536 inputs) in Q4_K, Q5_K and Q6_K, and, as llama.cpp falls back where a row is no whole
number of 256-weight blocks (SmolLM2's 576 inputs), the gate projections in Q5_0 / Q5_1 (the rest stay Q4_1 /
Q8_0). Loaded kept quantized (packed int8 panels where the int8 tiles run) against the same file dequantised to
float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.models.bundled import bundled_model_path
from kubeinfer.engine.models.loader import load_model

from tests.engine.k_quants import ENCODERS, k_quant_gguf
from tests.engine.test_quantized_model import assert_teacher_forced_close

pytestmark = pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build")

K_TYPES = [GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K]
FALLBACKS = [GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1]


@pytest.mark.parametrize("kind", K_TYPES, ids=lambda t: t.name)
def test_k_quant_blocks_decode_as_ggml_does(kind: GGMLQuantizationType) -> None:
    """The test's encoders write ggml's layout (the gguf package reads back what was meant), and the kernels'
    own decoding of those blocks is ggml's to the bit."""
    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32) * 0.05
    blocks = ENCODERS[kind](x)
    reference = dequantize(blocks, kind).reshape(x.shape)
    step = {GGMLQuantizationType.Q6_K: 1 / 31, GGMLQuantizationType.Q5_K: 1 / 31}.get(kind, 1 / 15)
    assert np.abs(reference - x).max() <= step * np.abs(x).max()
    ours = qk.dequantize(qk.GGUF_TYPES[kind.name], torch.from_numpy(blocks), 512)
    assert torch.equal(ours, torch.from_numpy(reference.astype(np.float32)))


@pytest.fixture(scope="module")
def k_quant_models(tmp_path_factory):
    path = tmp_path_factory.mktemp("k_quants") / "smollm2-k-quants.gguf"
    changed = k_quant_gguf(bundled_model_path(), path, {"ffn_down": K_TYPES, "ffn_gate": FALLBACKS})
    assert sorted({kind.name for kind in changed.values()}) == ["Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qk, "packs_panels", lambda qtype: False)
        unpacked = load_model(str(path), dtype="float32", quantization="gguf")
    return (load_model(str(path), dtype="float32", quantization="gguf"), unpacked,
            load_model(str(path), dtype="float32", quantization="none"))


def test_k_quants_are_kept_quantized_and_packed(k_quant_models) -> None:
    packed, _, _ = k_quant_models
    assert packed.weights.qtypes == ["Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
    for layer in packed.model.model.layers:
        parts = [*layer.mlp.down_proj.quantized.segments, *layer.mlp.gate_up_proj.quantized.segments]
        assert {part.qtype for _, part in layer.mlp.down_proj.quantized.segments} <= {qk.Q4_K, qk.Q5_K, qk.Q6_K}
        for _, part in parts:
            assert part.packed == qk.packs_panels(part.qtype)


@pytest.mark.parametrize("mode", ["f32", "q8"])
def test_k_quant_logits_close_to_dequantised_float32(k_quant_models, mode: str, monkeypatch) -> None:
    """Teacher-forced on the dense model's greedy continuation through chunked prefill; int8 activations on the
    packed weights, float32 ones on the blocks (packed panels take int8 activations only)."""
    monkeypatch.setattr(qk, "default_activations", lambda qtype, rows=1: mode)
    packed, unpacked, dense = k_quant_models
    assert_teacher_forced_close(dense, packed if mode == "q8" else unpacked, mode)


def test_a_fused_weight_with_a_type_without_kernels_is_dequantised_whole(tmp_path) -> None:
    """A file whose q_proj is F16 beside Q4_1 k/v (llama.cpp leaves some tensors F16): the fused QKV cannot be
    half kept, half dense, so all of it is dequantised (it used to fail to load); the rest stays quantized, and
    the model computes what the same file dequantised does."""
    path = tmp_path / "f16-q.gguf"
    k_quant_gguf(bundled_model_path(), path, {"attn_q": [GGMLQuantizationType.F16]})
    mixed = load_model(str(path), dtype="float32", quantization="gguf")
    dense = load_model(str(path), dtype="float32", quantization="none")
    for layer in mixed.model.model.layers:
        assert layer.self_attn.qkv_proj.quantized is None and layer.self_attn.qkv_proj.weight.numel()
        assert layer.mlp.down_proj.quantized is not None
    for got, want in zip(mixed.model.model.layers, dense.model.model.layers, strict=True):
        assert torch.equal(got.self_attn.qkv_proj.weight, want.self_attn.qkv_proj.weight)
