"""Which matmul a CPU linear takes (by rows, dtype and whether oneDNN packed the weight), and that every
path gives ``F.linear``'s answer through the layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kubeinfer.engine import cpu_features
from kubeinfer.engine.layers import cpu_kernels, cpu_linear, onednn
from kubeinfer.engine.layers.embedding import ParallelLMHead
from kubeinfer.engine.layers.linear import MergedColumnParallelLinear

SMALL = cpu_linear.SMALL_BATCH_MAX_ROWS


def test_path_choice() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_linear.uses_kernel(1, dtype, packed=True) and cpu_linear.uses_kernel(SMALL, dtype, packed=True)
        assert not cpu_linear.uses_kernel(SMALL + 1, dtype, packed=True)
        assert cpu_linear.uses_kernel(512, dtype, packed=False)  # no oneDNN copy: F.linear is the slow path
    assert not cpu_linear.uses_kernel(1, torch.float64, packed=False)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, SMALL, SMALL + 5])
def test_layers_match_f_linear_on_every_path(dtype: torch.dtype, rows: int, monkeypatch) -> None:
    """With the CPU's real oneDNN support, and with bf16 packing faked off (AVX2-only CPUs)."""
    for flags in (None, "avx avx2 fma f16c"):
        if flags is not None:
            monkeypatch.setenv(cpu_features.FLAGS_ENV, flags)
        torch.manual_seed(8)
        layers = [MergedColumnParallelLinear(96, [64, 64]), ParallelLMHead(300, 96)]
        for layer in layers:
            torch.nn.init.normal_(layer.weight)
            layer.to(dtype)
            onednn.prepack_model(layer)
            x = torch.randn(rows, 96, dtype=dtype)
            expected = F.linear(x.double(), layer.weight.double())
            got = layer(x).double()
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got, expected, atol=tolerance * 10, rtol=tolerance)


def test_torch_kernels_setting_keeps_f_linear(monkeypatch) -> None:
    from kubeinfer.engine.layers import ops

    calls = []
    monkeypatch.setattr(cpu_kernels, "linear", lambda *a, **k: calls.append(a))
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    ops._fused_module.cache_clear()
    try:
        layer = MergedColumnParallelLinear(8, [4, 4])
        torch.nn.init.normal_(layer.weight)
        layer(torch.randn(1, 8))
    finally:
        monkeypatch.delenv(ops.KERNELS_ENV)
        ops._fused_module.cache_clear()
    assert calls == []
