"""Quantized weights on a GPU: after loading, each kept-quantized weight moves into a layout one of the Triton
kernels multiplies (``triton_quant.py``: dequantised inside the K loop, fp32 accumulation):

- Q4_0 / Q4_1 / Q4_K rows (GGUF files, and AWQ / GPTQ checkpoints, which load as Q4_1) -> the 4-bit layout,
  groups of 32 (Q4_K's sub-block scales and mins exactly, in float32);
- the other kept GGUF types (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K) -> byte codes with a float32 scale and min per group
  (32 weights, Q6_K's 16), exactly the format's values;
- int8 rows (``--quantization int8``) -> the int8 layout, a scale per output row;
- the dense linear weights of ``--quantization fp8`` -> e4m3 with per-channel scales (``torch._scaled_mm``).

A GGUF file's embedding and LM head are dequantised (vLLM keeps them dense on the GPU too). The kernels run
wherever Triton does, so the conversion and the matmuls are tested on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kubeinfer.engine.layers import quant_kernels as qk
from kubeinfer.engine.layers.quantization import QuantizedRows, QuantizedWeight
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class DeviceRows:
    """Rows of one weight in a GPU kernel's layout: ``int4`` (``weight`` packed nibbles, ``scales`` and ``mins``
    per group of 32), ``groups`` (byte codes, ``scales`` and ``mins`` per ``group``), ``int8`` and ``fp8``
    (``scales`` per row), or ``dense``."""

    kind: str
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    group: int = 32

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales, self.mins) if t is not None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        from kubeinfer.engine.layers import triton_quant

        if self.kind == "int4":
            return triton_quant.int4_matmul(x, self.weight, self.scales, self.mins)
        if self.kind == "groups":
            return triton_quant.int8_groups_matmul(x, self.weight, self.scales, self.mins, self.group)
        if self.kind == "int8":
            return triton_quant.int8_matmul(x, self.weight, self.scales)
        if self.kind == "fp8":
            return triton_quant.fp8_matmul(x, self.weight, self.scales)
        return F.linear(x, self.weight)


@dataclass
class DeviceWeight:
    """A linear layer's weight on the GPU: its row segments, each in a kernel's layout (a fused QKV of mixed types
    keeps one segment per type), and the input order GPTQ act-order needs. Multiplies as ``QuantizedWeight``."""

    rows: int
    segments: list[tuple[int, DeviceRows]]
    type_names: set[str]  # the formats it came from, for the weight report
    perm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for _, part in self.segments)

    @property
    def runs_a_kernel(self) -> bool:
        return any(part.kind != "dense" for _, part in self.segments)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if len(self.segments) == 1 and self.segments[0][1].rows == self.rows:
            out = self.segments[0][1].matmul(x)
        else:  # (rows no segment holds are 0, as in QuantizedWeight)
            out = x.new_zeros(*x.shape[:-1], self.rows)
            for offset, part in self.segments:
                out[..., offset:offset + part.rows] = part.matmul(x)
        return out if bias is None else out + bias.to(out.dtype)


def device_rows(part: QuantizedRows, device: torch.device, dtype: torch.dtype) -> DeviceRows:
    """One segment's rows (as loaded, on the CPU) in the layout the GPU kernels take for its format."""
    from kubeinfer.engine.layers import triton_quant

    if part.packed:
        raise ValueError("packed int8 panels are a CPU layout: convert the rows before packing them")
    if part.qtype in (qk.Q4_0, qk.Q4_1, qk.Q4_K):
        if part.qtype == qk.Q4_K:
            qweight, scales, mins = triton_quant.repack_gguf_q4_k(part.data, part.k)
        else:
            qweight, scales, mins = triton_quant.repack_gguf_q4(part.data, part.qtype, part.k)
        return DeviceRows("int4", qweight.to(device), scales.to(device), mins.to(device))
    if part.qtype == qk.INT8_ROW:
        return DeviceRows("int8", part.data.to(device), part.scales.to(device))
    if part.qtype in (qk.Q8_0, qk.Q5_0, qk.Q5_1, qk.Q5_K, qk.Q6_K):
        codes, scales, mins, group = triton_quant.repack_gguf_groups(part.data, part.qtype, part.k)
        return DeviceRows("groups", codes.to(device), scales.to(device), mins.to(device), group)
    return DeviceRows("dense", qk.dequantize(part.qtype, part.data, part.k, part.scales).to(device, dtype))


def fp8_weight(weight: torch.Tensor) -> DeviceWeight:
    """A dense linear weight in e4m3 with a float32 scale per output row (``--quantization fp8``)."""
    from kubeinfer.engine.layers import triton_quant

    qweight, scales = triton_quant.fp8_quantize(weight)
    return DeviceWeight(weight.shape[0], [(0, DeviceRows("fp8", qweight, scales))], {"FP8"})


def to_device_kernels(model: nn.Module, device: torch.device, dtype: torch.dtype, method: str) -> int:
    """After loading for a GPU (``device``): every kept-quantized weight in the GPU kernels' layouts, the
    quantized embedding tables dequantised, and under ``fp8`` every dense linear weight in e4m3. Returns how
    many linear weights run a quantized kernel."""
    from kubeinfer.engine.layers.embedding import VocabParallelEmbedding
    from kubeinfer.engine.layers.linear import LinearBase

    tables: dict[int, nn.Parameter] = {}  # (a tied LM head shares its embedding's table)
    weights: dict[int, DeviceWeight] = {}  # (modules sharing one store share its conversion)
    dense_types: Counter[str] = Counter()
    for module in model.modules():
        store = getattr(module, "quantized", None)
        if isinstance(module, VocabParallelEmbedding) and isinstance(store, QuantizedWeight):
            if id(store) not in tables:
                tables[id(store)] = nn.Parameter(store.dequantised().to(device, dtype), requires_grad=False)
            module.weight, module.quantized = tables[id(store)], None
        elif isinstance(module, LinearBase) and isinstance(store, QuantizedWeight):
            if id(store) not in weights:
                segments = [(offset, device_rows(part, device, dtype)) for offset, part in store.segments]
                dense_types.update(qk.TYPE_NAMES[part.qtype] for (_, part), (_, rows)
                                   in zip(store.segments, segments, strict=True) if rows.kind == "dense")
                perm = None if store.perm is None else store.perm.to(device)
                weights[id(store)] = DeviceWeight(store.rows, segments, store.type_names, perm)
            module.quantized = weights[id(store)]
        elif isinstance(module, LinearBase) and method == "fp8" and module.weight.numel():
            module.quantized = weights[id(module)] = fp8_weight(module.weight.data)
            module.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
    if dense_types:
        logger.info("quantized weights dequantised to %s on %s (no GPU kernel for the type): %s",
                    str(dtype).removeprefix("torch."), device.type,
                    ", ".join(f"{n} x {name}" for name, n in sorted(dense_types.items())))
    return sum(weight.runs_a_kernel for weight in weights.values())

