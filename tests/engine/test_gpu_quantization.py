"""Quantized weights on a GPU (engine/layers/gpu_quantization.py), tested where no GPU is: the same conversion
from the loaded rows into the Triton kernels' layouts, on CPU tensors, the kernels in Triton's interpreter
(``make gpu-check`` runs the compiled kernels). A tiny AWQ model (Q4_1 rows -> the 4-bit kernel) and a tiny
``--quantization int8`` one (-> the int8 kernel) against the same weights dense; the bundled GGUF's layout
(Q4_1 -> 4-bit, its Q8_0 embedding and LM head -> dense tables); fp8 through ``torch._scaled_mm``.
"""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.layers.gpu_quantization import DeviceWeight, to_device_kernels
from kubeinfer.engine.layers.quantization import UnsupportedQuantization, resolve_method, weight_report
from kubeinfer.engine.models import loader

from tests.engine.awq_gptq_packing import make_int4_checkpoints
from tests.engine.model_harness import generate_paged
from tests.engine.test_triton_attention import in_interpreter, interpreter_pool
from tests.engine.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not qk.available(), reason="the quantized CPU kernels did not build")
PROMPTS = [[1, 5, 9, 2, 7, 3], [4, 4, 8]]


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield pool


def _unpacked(path: str, quantization: str | None = None) -> loader.LoadedModel:
    """Loaded on the CPU as for a GPU: the rows as the loader keeps them, no CPU packing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "pack_panels", lambda model: 0)
        return loader.load_model(path, dtype="float32", quantization=quantization)


def _logits(model, prompts=PROMPTS) -> torch.Tensor:
    return torch.cat([torch.stack(s.logits) for s in generate_paged(model, prompts, max_new_tokens=3, chunk=4)])


def check_tiny_model(module, quantized_dir: str, reference_dir: str, quantization: str | None, kind: str) -> None:
    """(Runs in the interpreter worker.) The converted model's linears run ``kind`` kernels, and its logits are
    the reference's (``reference_dir`` as the CPU kernels run it, with ``quantization``) but for rounding."""
    quantized = _unpacked(quantized_dir, quantization)
    reference = loader.load_model(reference_dir, dtype="float32", quantization=quantization)
    count = to_device_kernels(quantized.model, torch.device("cpu"), torch.float32, quantized.quantization)
    layers = [m for m in quantized.model.modules() if isinstance(getattr(m, "quantized", None), DeviceWeight)]
    assert count == len(layers) == 4 * quantized.config.num_layers
    assert {part.kind for m in layers for _, part in m.quantized.segments} == {kind}
    want, got = _logits(reference.model), _logits(quantized.model)
    assert float((got - want).abs().max()) < 2e-3 * float(want.abs().max())


def test_awq_checkpoint_runs_the_4_bit_kernel(interp, tmp_path) -> None:
    """Against the same weights dense (as Q4_1 holds them: -s * z rounded to fp16)."""
    quantized_dir, dense_dir = make_int4_checkpoints("awq", tmp_path, group_size=32, min_rounded=True)
    in_interpreter(interp, check_tiny_model, str(quantized_dir), str(dense_dir), None, "int4",
                   module="kubeinfer.engine.layers.triton_quant")


def test_int8_runs_the_int8_kernel(interp, tmp_path) -> None:
    """Against the CPU's int8 rows (the same requantised weights; float32 activations there)."""
    path = str(make_tiny_checkpoint("llama", tmp_path / "tiny"))
    in_interpreter(interp, check_tiny_model, path, path, "int8", "int8", module="kubeinfer.engine.layers.triton_quant")


def check_converted_weight(module, rows) -> None:
    """(Interpreter worker.) A converted weight against its rows dequantised."""
    weight, dense = rows
    x = torch.randn(5, dense.shape[1], generator=torch.Generator().manual_seed(0))
    want = x.double() @ dense.double().T
    got = weight.matmul(x).double()
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_bundled_gguf_moves_into_the_gpu_layouts(interp) -> None:
    loaded = _unpacked(None)
    gate_up = loaded.model.model.layers[0].mlp.gate_up_proj.quantized
    dense_gate_up = qk.dequantize(qk.Q4_1, gate_up.segments[0][1].data, gate_up.k)
    table = qk.dequantize(qk.Q8_0, loaded.model.model.embed_tokens.quantized.segments[0][1].data, 576)
    to_device_kernels(loaded.model, torch.device("cpu"), torch.float32, "gguf")
    embed, head = loaded.model.model.embed_tokens, loaded.model.lm_head
    assert embed.quantized is None and head.quantized is None and head.weight is embed.weight  # (tied, dense)
    assert torch.equal(embed.weight[:table.shape[0]], table)
    for layer in loaded.model.model.layers:
        for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(proj.quantized, DeviceWeight) and proj.quantized.type_names == {"Q4_1"}
            assert [part.kind for _, part in proj.quantized.segments] == ["int4"]
    assert weight_report(loaded.model).qtypes == ["Q4_1"]  # (the dense tables are dense bytes now)
    in_interpreter(interp, check_converted_weight, (loaded.model.model.layers[0].mlp.gate_up_proj.quantized,
                                                 dense_gate_up), module="kubeinfer.engine.layers.triton_quant")


def test_a_q4_k_m_weight_keeps_every_segment_quantized(interp) -> None:
    """Q4_K rows -> the 4-bit kernel (their sub-block scales exactly), Q6_K rows beside them -> byte codes with
    a scale and min per 16."""
    from kubeinfer.engine.layers.gpu_quantization import device_rows
    from kubeinfer.engine.layers.quantization import QuantizedRows

    from tests.engine.test_quant_kernels import random_blocks

    k = 512
    q4 = torch.from_numpy(random_blocks(qk.Q4_K, 64, k, seed=2))
    q6 = torch.from_numpy(random_blocks(qk.Q6_K, 32, k, seed=3))
    segments = [(0, device_rows(QuantizedRows(qk.Q4_K, q4, k), torch.device("cpu"), torch.float32)),
                (64, device_rows(QuantizedRows(qk.Q6_K, q6, k), torch.device("cpu"), torch.float32))]
    assert [(part.kind, part.group) for _, part in segments] == [("int4", 32), ("groups", 16)]
    weight = DeviceWeight(96, segments, {"Q4_K", "Q6_K"})
    dense = torch.cat([qk.dequantize(qk.Q4_K, q4, k), qk.dequantize(qk.Q6_K, q6, k)])
    in_interpreter(interp, check_converted_weight, (weight, dense), module="kubeinfer.engine.layers.triton_quant")


def test_fp8_weights_through_scaled_mm(tmp_path) -> None:
    """e4m3 weights with per-channel scales, activations quantized per row (torch._scaled_mm runs on the CPU
    too): each linear within fp8's rounding (3 mantissa bits on each side: a few % of its largest output) of
    the float32 one, the dense weights gone, and the model still runs. (A random tiny model amplifies a few %
    per layer into its logits, so they are not compared.)"""
    path = str(make_tiny_checkpoint("llama", tmp_path / "tiny"))
    fp8, dense = loader.load_model(path, dtype="float32"), loader.load_model(path, dtype="float32")
    assert to_device_kernels(fp8.model, torch.device("cpu"), torch.float32, "fp8") == 4 * fp8.config.num_layers
    pairs = [(m, d) for m, d in zip(fp8.model.modules(), dense.model.modules(), strict=True)
             if isinstance(getattr(m, "quantized", None), DeviceWeight)]
    assert len(pairs) == 4 * fp8.config.num_layers
    for module, reference in pairs:
        assert module.weight.numel() == 0 and module.quantized.segments[0][1].weight.dtype == torch.float8_e4m3fn
        x = torch.randn(7, reference.weight.shape[1], generator=torch.Generator().manual_seed(1))
        want = torch.nn.functional.linear(x, reference.weight)
        assert float((module.quantized.matmul(x) - want).abs().max()) < 0.1 * float(want.abs().max())
    assert torch.isfinite(_logits(fp8.model)).all()


@pytest.mark.parametrize(("method", "kind"), [("gguf", "gguf"), ("int8", "hf"), ("awq", "hf"), ("gptq", "hf"),
                                              ("fp8", "hf"), ("int8", "gguf")])
def test_gpu_quantization_combinations_are_supported(method: str, kind: str) -> None:
    checkpoint = method if method in ("awq", "gptq") else None
    assert resolve_method(method, kind, torch.device("cuda"), checkpoint) == method
    assert resolve_method(None, "gguf", torch.device("cuda")) == "gguf"  # a .gguf keeps its tensors there too
    with pytest.raises(UnsupportedQuantization, match="fp8 with a Hugging Face checkpoint on cuda"):
        resolve_method("fp8", "hf", torch.device("cpu"))


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"])
def test_other_gguf_types_run_byte_codes_exactly(interp, name: str) -> None:
    from kubeinfer.engine.layers.gpu_quantization import device_rows
    from kubeinfer.engine.layers.quantization import QuantizedRows

    from tests.engine.test_quant_kernels import random_blocks

    qtype, k = qk.GGUF_TYPES[name], 512
    blocks = torch.from_numpy(random_blocks(qtype, 40, k, seed=4))
    rows = device_rows(QuantizedRows(qtype, blocks, k), torch.device("cpu"), torch.float32)
    assert rows.kind == "groups" and rows.group == (16 if name == "Q6_K" else 32)
    values = rows.weight.double() * rows.scales.double().repeat_interleave(rows.group, 1)
    values += rows.mins.double().repeat_interleave(rows.group, 1)
    assert torch.equal(values.float(), qk.dequantize(qtype, blocks, k))  # (exact: the format's own values)
    in_interpreter(interp, check_converted_weight, (DeviceWeight(40, [(0, rows)], {name}),
                                                    qk.dequantize(qtype, blocks, k)),
                   module="kubeinfer.engine.layers.triton_quant")
