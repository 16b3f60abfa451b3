"""Weights kept quantized: the linear layers, the embedding and the LM head hold their rows of quantized
blocks (GGUF's, or int8 rows with per-output-channel scales) and multiply with the C++ kernels.

``prepare_model`` runs between building the model and loading its weights. It swaps the dense weight
parameters of those modules for empty placeholders (so no dense copy is ever allocated) and wraps their weight
loaders: a ``QuantizedRows`` checkpoint tensor goes through the layer's *own* sharding code (column, row,
fused QKV / gate-up, vocabulary shards) against a ``_RowSink`` standing in for the parameter, so quantized
weights shard along exactly the dimensions the dense ones do, with their scales. A dense tensor arriving
for such a module (a GGUF tensor of a type without a kernel, an F16 embedding) materialises the dense
parameter and loads as before; with ``int8`` a dense linear weight is quantized on arrival instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from kubeinfer.engine.config import QUANTIZATION_METHODS
from kubeinfer.engine.layers import quant_kernels as qk
from torch import nn

logger = logging.getLogger(__name__)

METHODS = QUANTIZATION_METHODS
# (method, checkpoint kind, device type) combinations that work today
SUPPORTED = {(method, kind, device) for method in ("gguf", "int8", "none") for kind in ("gguf", "hf")
             for device in ("cpu", "cuda") if (method, kind) != ("gguf", "hf")}
SUPPORTED |= {("awq", "hf", "cpu"), ("gptq", "hf", "cpu"), ("awq", "hf", "cuda"), ("gptq", "hf", "cuda"),
              ("fp8", "hf", "cuda")}  # (on a GPU through the Triton kernels: gpu_quantization.py)
PREQUANTIZED = ("awq", "gptq")  # methods that read a checkpoint quantized that way (config.json quantization_config)


class UnsupportedQuantization(ValueError):
    """A --quantization value that this checkpoint, device or build cannot run."""


def resolve_method(requested: str | None, kind: str, device: torch.device, checkpoint: str | None = None) -> str:
    """The method to use for a checkpoint of ``kind`` (``gguf`` or ``hf``) on ``device``: ``None`` means the
    checkpoint's own ``checkpoint`` method (its config.json ``quantization_config.quant_method``: awq or gptq,
    as vLLM does), else ``gguf`` for a GGUF file (on a GPU its kept tensors run the Triton kernels:
    gpu_quantization.py) and ``none`` otherwise. Raises
    ``UnsupportedQuantization`` naming the supported combinations, or when the method and a pre-quantized
    checkpoint do not match."""
    if checkpoint is not None and checkpoint not in PREQUANTIZED:
        raise UnsupportedQuantization(f"the checkpoint is quantized with {checkpoint!r} (config.json "
                                      "quantization_config), which cannot be loaded; pre-quantized checkpoints "
                                      f"supported: {', '.join(PREQUANTIZED)} (4-bit)")
    if requested is None and checkpoint is not None:
        requested = checkpoint
    if requested is None:
        requested = "gguf" if kind == "gguf" and qk.available() else "none"
    if requested not in METHODS:
        raise UnsupportedQuantization(f"unknown quantization {requested!r}; expected one of {', '.join(METHODS)}")
    if (requested, kind, device.type) not in SUPPORTED:
        combos = "; ".join(f"{m} with a {'GGUF file' if k == 'gguf' else 'Hugging Face checkpoint'} on {d}"
                           for m, k, d in sorted(SUPPORTED) if m != "none")
        what = "a GGUF file" if kind == "gguf" else "a Hugging Face checkpoint"
        raise UnsupportedQuantization(f"--quantization {requested} is not supported for {what} on {device.type}; "
                                      f"supported: {combos} (or none: full precision)")
    if requested in PREQUANTIZED and checkpoint != requested:
        has = f"is quantized with {checkpoint}" if checkpoint else "has no quantization_config in its config.json"
        raise UnsupportedQuantization(f"--quantization {requested} needs a checkpoint quantized with {requested} "
                                      f"(config.json quantization_config.quant_method {requested!r}); this one {has}")
    if checkpoint is not None and requested != checkpoint:
        raise UnsupportedQuantization(f"the checkpoint is quantized with {checkpoint}: use --quantization "
                                      f"{checkpoint} or leave it unset (--quantization {requested} cannot read "
                                      "its packed weights)")
    if requested != "none" and not qk.available():
        raise UnsupportedQuantization(f"--quantization {requested} needs the quantized CPU kernels, which did not "
                                      "build here (is a C++ compiler installed?)")
    return requested


@dataclass
class QuantizedRows:
    """``shape[0]`` rows of ``shape[1]`` weights in a kernel format: ``data`` is ``uint8 [N, row_bytes]``
    (``int8 [N, K]`` for INT8_ROW, with ``scales float32 [N]``). ``narrow`` slices like a dense tensor's.
    ``perm`` (int64 [K], GPTQ act-order): the rows hold the inputs in this order, ``x[:, perm]`` multiplies."""

    qtype: int
    data: torch.Tensor
    k: int
    scales: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    packed: bool = False  # data holds packed int8 panels (quant_kernels.pack_panels), not the format's blocks

    @property
    def kernel_type(self) -> int:
        """The type code the kernels take: the format's, marked when the rows are packed."""
        return self.qtype | qk.PACKED if self.packed else self.qtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.k)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (0 if self.scales is None else self.scales.numel() * 4)

    def narrow(self, dim: int, start: int, length: int) -> QuantizedRows:
        if self.packed and (dim != 0 or start % qk.PANEL_ROWS or length % qk.PANEL_ROWS):
            raise ValueError("packed panels split only into whole panels of rows")
        if dim == 0:
            scales = None if self.scales is None else self.scales.narrow(0, start, length)
            return QuantizedRows(self.qtype, self.data.narrow(0, start, length), self.k, scales, self.perm,
                                 self.packed)
        if self.perm is not None:
            if start == 0 and length == self.k:
                return self
            raise UnsupportedQuantization(
                f"act-order (desc_act) weights cannot be split by their inputs at [{start}, {start + length}) "
                f"of {self.k} (a row-parallel layer under tensor parallelism): use --tensor-parallel-size 1 "
                "or a checkpoint quantized with desc_act: false")
        block_bytes, block_elems = qk.BLOCKS[self.qtype]
        if start % block_elems or length % block_elems:
            raise ValueError(f"cannot split {self.k} quantized input features at [{start}, {start + length}): "
                             f"not a multiple of the {block_elems}-element block")
        byte_start, byte_len = start // block_elems * block_bytes, length // block_elems * block_bytes
        return QuantizedRows(self.qtype, self.data.narrow(1, byte_start, byte_len), length, self.scales)

    def contiguous(self) -> QuantizedRows:
        scales = None if self.scales is None else self.scales.contiguous()
        return QuantizedRows(self.qtype, self.data.contiguous(), self.k, scales, self.perm, self.packed)

    def dequantised(self) -> torch.Tensor:
        """These rows as float32 ``[N, K]``, inputs in their natural order."""
        rows = qk.dequantize(self.kernel_type, self.data, self.k, self.scales)
        if self.perm is None:
            return rows
        dense = torch.empty_like(rows)
        dense[:, self.perm] = rows
        return dense

    def packed_panels(self) -> QuantizedRows:
        """These rows as packed int8 panels where the kernels here multiply them so (quant_kernels.packs_panels,
        whole panels of rows); else themselves. The blocks are not kept beside the panels."""
        if self.packed or self.shape[0] % qk.PANEL_ROWS or not qk.packs_panels(self.qtype):
            return self
        return QuantizedRows(self.qtype, qk.pack_panels(self.qtype, self.data, self.k), self.k, self.scales,
                             self.perm, packed=True)


def quantize_int8_rows(weight: torch.Tensor) -> QuantizedRows:
    """Weight-only int8 with one scale per output row (symmetric, max |w| -> 127)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    if w.shape[1] % 32:
        raise UnsupportedQuantization(f"int8 needs input features in multiples of 32, got {w.shape[1]}")
    return QuantizedRows(qk.INT8_ROW, q, w.shape[1], scales.contiguous())


@dataclass
class QuantizedWeight:
    """The quantized weight of one module: ``rows`` output rows of ``k`` inputs, as segments of rows (a fused
    QKV whose Q, K and V differ in type keeps one segment each; adjacent ones of one type are merged)."""

    rows: int
    k: int
    segments: list[tuple[int, QuantizedRows]] = field(default_factory=list)  # (first row, rows), sorted
    perm: torch.Tensor | None = None  # the input order every segment holds (GPTQ act-order), None: as is

    def put(self, offset: int, part: QuantizedRows) -> None:
        if part.k != self.k or offset < 0 or offset + part.shape[0] > self.rows:
            raise ValueError(f"quantized rows [{offset}, {offset + part.shape[0]}) x {part.k} do not fit a "
                             f"{self.rows} x {self.k} weight")
        if self.segments and not _same_perm(self.perm, part.perm):
            raise UnsupportedQuantization("the fused projections of one layer (q/k/v or gate/up) hold their "
                                          "inputs in different act-order (desc_act) permutations")
        self.perm = part.perm
        kept = [(o, p) for o, p in self.segments if o + p.shape[0] <= offset or o >= offset + part.shape[0]]
        kept.append((offset, part.contiguous()))
        kept.sort(key=lambda seg: seg[0])
        merged: list[tuple[int, QuantizedRows]] = []
        for o, p in kept:
            if (merged and merged[-1][1].qtype == p.qtype and not p.packed and not merged[-1][1].packed
                    and merged[-1][0] + merged[-1][1].shape[0] == o):
                prev_o, prev = merged.pop()
                scales = None if p.scales is None else torch.cat([prev.scales, p.scales])
                p, o = QuantizedRows(p.qtype, torch.cat([prev.data, p.data]), p.k, scales, p.perm), prev_o
            merged.append((o, p))
        self.segments = merged

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for _, p in self.segments)

    def pack_panels(self) -> None:
        """Once loaded: each segment the CPU kernels multiply faster as packed int8 panels becomes them."""
        self.segments = [(offset, part.packed_panels()) for offset, part in self.segments]

    @property
    def qtypes(self) -> set[int]:
        return {p.qtype for _, p in self.segments}

    @property
    def type_names(self) -> set[str]:
        return {qk.TYPE_NAMES[t] for t in self.qtypes}

    def dequantised(self) -> torch.Tensor:
        """The whole weight as float32 ``[rows, k]`` (rows no segment holds are 0)."""
        dense = torch.zeros(self.rows, self.k)
        for offset, part in self.segments:
            dense[offset:offset + part.shape[0]] = part.dequantised()
        return dense

    def _covers_all_rows(self) -> bool:
        return sum(p.shape[0] for _, p in self.segments) == self.rows

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        if rows.dtype not in (torch.float32, torch.bfloat16) or rows.stride(-1) != 1:
            rows = rows.float().contiguous()
        covered = self._covers_all_rows()
        full = len(self.segments) == 1 and covered
        out = None if full else (torch.empty if covered else torch.zeros)(rows.shape[0], self.rows, dtype=rows.dtype)
        for offset, part in self.segments:
            target = None if out is None else out.narrow(1, offset, part.shape[0])
            result = qk.matmul(rows, part.kernel_type, part.data, self.k, part.scales, out=target)
            out = result if out is None else out
        if bias is not None:
            out += bias.to(out.dtype)
        out = out.view(*x.shape[:-1], self.rows)
        return out if x.dtype == out.dtype else out.to(x.dtype)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantised (an embedding lookup of a quantized table; rows no segment holds are 0)."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()  # (no-ops for the engine's int64 ids)
        out = torch.empty(flat.shape[0], self.k, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        for i, (offset, part) in enumerate(self.segments):
            qk.embedding(part.kernel_type, part.data, self.k, part.scales, flat, offset, out, clear_outside=i == 0)
        if not self.segments:
            out.zero_()
        out = out.view(*ids.shape, self.k)
        return out if dtype == out.dtype else out.to(dtype)


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


class _RowSink:
    """Stands in for a weight parameter in a layer's weight loader: ``param.data.narrow(0, o, n).copy_(w)``,
    ``param.data[:n].copy_(w)`` and ``param.data.copy_(w)`` store quantized rows ``w`` at row ``o``."""

    def __init__(self, store: QuantizedWeight, offset: int = 0, rows: int | None = None) -> None:
        self.store, self.offset = store, offset
        self.rows = store.rows if rows is None else rows

    @property
    def data(self) -> _RowSink:
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.store.k)

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> _RowSink:
        if dim != 0:
            raise ValueError("quantized weights are stored by whole rows")
        return _RowSink(self.store, self.offset + start, length)

    def __getitem__(self, index: slice) -> _RowSink:
        start, stop, step = index.indices(self.rows)
        if step != 1:
            raise ValueError("quantized weights are stored by contiguous rows")
        return self.narrow(0, start, stop - start)

    def zero_(self) -> _RowSink:
        return self  # rows no segment holds read as zeros

    def copy_(self, source: QuantizedRows) -> _RowSink:
        if source.shape[0] != self.rows:
            raise ValueError(f"{source.shape[0]} quantized rows for a slot of {self.rows}")
        self.store.put(self.offset, source)
        return self


def _is_linear(module: nn.Module) -> bool:
    from kubeinfer.engine.layers.linear import LinearBase

    return isinstance(module, LinearBase)


def _is_vocab(module: nn.Module) -> bool:
    from kubeinfer.engine.layers.embedding import VocabParallelEmbedding

    return isinstance(module, VocabParallelEmbedding)


def prepare_model(model: nn.Module, method: str) -> None:
    """Before loading: the weights of linear layers, embeddings and LM heads become quantized slots
    (``gguf``: every module; ``int8``: the linear layers, quantized as their weights arrive; ``awq``/``gptq``:
    the linear layers, fed Q4_1 rows repacked from the checkpoint's, dense where a layer was not converted;
    ``fp8`` loads dense weights, quantized once loaded: gpu_quantization.py)."""
    if method in ("none", "fp8"):
        return
    groups: dict[int, list[nn.Module]] = {}  # modules sharing one weight parameter (tied embeddings)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and (_is_linear(module) or (method == "gguf" and _is_vocab(module))):
            groups.setdefault(id(weight), []).append(module)
    for modules in groups.values():
        _make_slot(modules, int8=method == "int8")


def _make_slot(modules: list[nn.Module], int8: bool) -> None:
    owner = modules[0]
    dense = owner.weight
    original_loader = dense.weight_loader
    shape, dtype, device = tuple(dense.shape), dense.dtype, dense.device
    store = QuantizedWeight(rows=shape[0], k=shape[1])
    placeholder = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)

    def materialise() -> nn.Parameter:
        """The dense parameter, allocated on first need (a tensor of a type without a kernel)."""
        if owner.weight is not placeholder:
            return owner.weight
        param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
        param.weight_loader = loader
        for module in modules:
            module.weight = param
        return param

    def loader(param: nn.Parameter, loaded_weight: torch.Tensor | QuantizedRows, *shard: object) -> None:
        if int8 and isinstance(loaded_weight, torch.Tensor) and loaded_weight.dim() == 2:
            loaded_weight = quantize_int8_rows(loaded_weight)
        if isinstance(loaded_weight, QuantizedRows) and owner.weight is placeholder:
            original_loader(_RowSink(store), loaded_weight, *shard)
            for module in modules:
                module.quantized = store
            return
        if isinstance(loaded_weight, QuantizedRows):  # a shard kept quantized beside dense ones: dense too
            loaded_weight = loaded_weight.dequantised()
        elif store.segments:  # a dense shard (a type without a kernel) after kept ones, e.g. an F16 q_proj
            dense_instead()
        original_loader(materialise(), loaded_weight, *shard)

    def dense_instead() -> None:
        """The rows kept so far, dequantised into the dense weight: one weight is one or the other."""
        logger.info("%s: its shards mix kept and dequantised GGUF types, so all of it is dequantised",
                    type(owner).__name__)
        materialise().data.copy_(store.dequantised())
        store.segments.clear()
        for module in modules:
            module.quantized = None

    placeholder.weight_loader = loader
    for module in modules:
        module.weight = placeholder
        module.quantized = None


def pack_panels(model: nn.Module) -> int:
    """After loading, on the CPU: the quantized weights that int8 tiles multiply become packed int8 panels
    (llama.cpp repacks its CPU weights likewise), so that no matmul builds panels and one row runs the batch's
    tiles. Returns how many weights hold packed rows."""
    if not qk.available():
        return 0
    stores = {id(m.quantized): m.quantized for m in model.modules() if getattr(m, "quantized", None) is not None}
    for store in stores.values():
        store.pack_panels()
    count = sum(any(p.packed for _, p in store.segments) for store in stores.values())
    if count:
        logger.info("%d of %d quantized weights kept as packed int8 panels", count, len(stores))
    return count


@dataclass
class WeightReport:
    dense_bytes: int
    quantized_bytes: int
    quantized_tensors: int
    qtypes: list[str]

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.quantized_bytes


def weight_report(model: nn.Module) -> WeightReport:
    """Bytes the weights occupy: dense parameters and buffers (oneDNN's packed copies included) and
    quantized rows, each tensor counted once."""
    seen: set[int] = set()
    dense = quantized = count = 0
    qtypes: set[str] = set()

    def add(tensor: torch.Tensor) -> int:
        if id(tensor) in seen:
            return 0
        seen.add(id(tensor))
        try:
            return tensor.numel() * tensor.element_size()
        except RuntimeError:  # an opaque mkldnn tensor
            return 0

    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            dense += add(tensor)
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            dense += add(packed)
        store = getattr(module, "quantized", None)
        if store is not None and id(store) not in seen:
            seen.add(id(store))
            quantized += store.nbytes
            count += 1
            qtypes |= store.type_names
    return WeightReport(dense, quantized, count, sorted(qtypes))


def _activations_of(qtype: int, name: str) -> str:
    one, batch = qk.default_activations(qtype, 1), qk.default_activations(qtype, 2)
    return f"{name} x {one}" if one == batch else f"{name} x {one} (one row), {batch} (batches)"


def log_weight_report(model: nn.Module, method: str) -> WeightReport:
    report = weight_report(model)
    mib = 1 << 20
    if report.quantized_tensors:
        codes = {name: code for code, name in qk.TYPE_NAMES.items()}
        activations = sorted({_activations_of(codes[t], t) for t in report.qtypes if t in codes}) \
            if qk.available() else []
        logger.info("weights resident: %.1f MiB (quantization %s: %d quantized weights, %.1f MiB in %s; "
                    "dense %.1f MiB); CPU matmul activations: %s", report.total_bytes / mib, method,
                    report.quantized_tensors, report.quantized_bytes / mib, "/".join(report.qtypes),
                    report.dense_bytes / mib, ", ".join(activations) or "-")
    else:
        logger.info("weights resident: %.1f MiB (no quantization)", report.total_bytes / mib)
    return report

