"""oneDNN-packed linear layers against ``F.linear`` (float32 and bfloat16), and when packing applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kubeinfer.engine import cpu_features
from kubeinfer.engine.layers import onednn, ops
from kubeinfer.engine.layers.embedding import ParallelLMHead
from kubeinfer.engine.layers.linear import QKVParallelLinear, RowParallelLinear

from tests.engine.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")


NO_BF16_PACKING = pytest.mark.skipif(not onednn.packs(torch.bfloat16),
                                     reason="oneDNN packs bf16 only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=NO_BF16_PACKING)])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_linear_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(320, 576, dtype=dtype), torch.randn(320, dtype=dtype)
    x = torch.randn(rows, 576, dtype=dtype)
    got = onednn.linear(x, onednn.pack(weight), bias)
    expected = F.linear(x.double(), weight.double(), bias.double())
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]  # outputs are ~24 in magnitude
    torch.testing.assert_close(got.double(), expected, atol=tolerance * 24, rtol=tolerance)


def test_leading_dimensions_are_kept() -> None:
    weight, x = torch.randn(16, 8), torch.randn(2, 3, 8)
    got = onednn.linear(x, onednn.pack(weight), None)
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-5, rtol=1e-5)


def test_prepack_model_packs_linears_and_the_lm_head_only_on_supported_dtypes() -> None:
    model = torch.nn.ModuleDict({"qkv": QKVParallelLinear(64, 16, 4, 2, bias=True),
                                 "o": RowParallelLinear(64, 64), "head": ParallelLMHead(100, 64)})
    for p in model.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 64)
    dense = {name: m(x) for name, m in model.items()}
    assert onednn.prepack_model(model) == 3
    assert all(m.packed_weight is not None for m in model.values())
    for name, m in model.items():
        torch.testing.assert_close(m(x), dense[name], atol=1e-4, rtol=1e-4)
    half = QKVParallelLinear(64, 16, 4, 2).to(torch.float16)
    assert onednn.prepack_model(half) == 0 and half.packed_weight is None


def test_bf16_is_packed_only_where_onednn_can(monkeypatch) -> None:
    """On an AVX2-only CPU (faked here on any machine) bf16 weights stay unpacked instead of raising."""
    monkeypatch.setenv(cpu_features.FLAGS_ENV, "avx avx2 fma f16c")
    layer = RowParallelLinear(64, 64).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight)  # the parameter is allocated uninitialised: old memory can hold NaNs
    assert not onednn.packs(torch.bfloat16) and onednn.packs(torch.float32)
    assert onednn.prepack_model(layer) == 0 and layer.packed_weight is None
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_torch_kernels_setting_turns_packing_off(monkeypatch) -> None:
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    layer = RowParallelLinear(8, 8)
    assert onednn.prepack_model(layer) == 0 and layer.packed_weight is None


def test_reloading_weights_drops_stale_packed_copies(tmp_path) -> None:
    from kubeinfer.engine.models.loader import iter_safetensors, load_model

    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    model = load_model(path, dtype="float32").model
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.packed_weight is not None and model.lm_head.packed_weight is not None
    model.load_weights(iter_safetensors(path))
    assert layer.packed_weight is None and model.lm_head.packed_weight is None
