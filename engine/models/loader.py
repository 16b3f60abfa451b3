"""``load_model()``: a checkpoint folder, a ``.gguf`` file or a Hub repo id → a ready LoadedModel."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from kubeinfer.engine.layers import cpu_kernels, onednn
from kubeinfer.engine.layers.gpu_quantization import to_device_kernels
from kubeinfer.engine.layers.linear import LinearBase
from kubeinfer.engine.layers.quantization import (
    PREQUANTIZED,
    QuantizedRows,
    WeightReport,
    log_weight_report,
    pack_panels,
    prepare_model,
    resolve_method,
)
from kubeinfer.engine.models.awq_gptq import (
    checkpoint_method,
    iter_int4_weights,
    parse_spec,
    quantization_config,
)
from kubeinfer.engine.models.config import ModelConfig, check_architecture
from kubeinfer.engine.models.dtype import resolve_dtype
from kubeinfer.engine.models.llama import LlamaForCausalLM
from kubeinfer.engine.tokenizer import end_of_generation_ids, load_tokenizer
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(FileNotFoundError, ValueError):
    """The model is neither a local path nor a downloadable Hub repo."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # eval mode, on device, in dtype
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    model_id: str  # the default served model name
    quantization: str = "none"  # how the weights are kept (engine/layers/quantization.py)
    weights: WeightReport | None = None  # resident weight bytes (rank 0)


def load_model(model: str | Path | None = None, *, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", revision: str | None = None, tp_rank: int = 0,
               tp_size: int = 1, quantization: str | None = None) -> LoadedModel:
    """Load ``model`` (None = the bundled SmolLM2 GGUF): a checkpoint dir, a ``.gguf`` file or a Hub repo id.
    On the CPU the dense linear weights are then packed for oneDNN (``onednn.prepack_model``) and the quantized
    ones, where int8 tiles multiply them, as int8 panels (``quantization.pack_panels``), and the C++ kernels' threads
    are chosen (``_share_threads_with_torch_linears``); on a GPU the quantized
    ones move into the Triton kernels' layouts (``gpu_quantization.to_device_kernels``)."""
    loaded = _load(model, dtype=dtype, device=torch.device(device), revision=revision, tp_rank=tp_rank,
                   tp_size=tp_size, quantization=quantization)
    onednn.prepack_model(loaded.model)
    if torch.device(device).type == "cpu":
        pack_panels(loaded.model)
        _share_threads_with_torch_linears(loaded.model)
    elif loaded.quantization != "none":
        to_device_kernels(loaded.model, torch.device(device), loaded.config.dtype, loaded.quantization)
    if tp_rank == 0:
        loaded.weights = log_weight_report(loaded.model, loaded.quantization)
    return loaded


def _share_threads_with_torch_linears(model: torch.nn.Module) -> None:
    """The CPU kernels' jobs run on their own work pool (spinning between a step's kernels, parked after it)
    where they do all of a step's parallel work (quantized weights), and in OpenMP regions on torch's threads
    where torch runs dense linears between them: two sets of threads would spin against each other."""
    dense = sum(1 for module in model.modules() if isinstance(module, LinearBase) and module.quantized is None)
    cpu_kernels.use_openmp_threads(dense > 0)
    logger.info("CPU kernels' parallel jobs: %s", f"OpenMP threads ({dense} dense linears run in torch)" if dense
                else "the kernels' work pool")


def _load(model: str | Path | None, *, dtype: str | torch.dtype, device: torch.device, revision: str | None,
          tp_rank: int, tp_size: int, quantization: str | None) -> LoadedModel:
    from kubeinfer.engine.models.gguf_loader import load_gguf

    opts = {"dtype": dtype, "device": device, "tp_rank": tp_rank, "tp_size": tp_size, "quantization": quantization}
    if model is None:
        from kubeinfer.engine.models.bundled import BUNDLED_MODEL_ID, bundled_model_path

        return load_gguf(bundled_model_path(), model_id=BUNDLED_MODEL_ID, **opts)
    path = Path(model).expanduser()
    if path.exists():
        model_id = path.stem if path.is_file() else path.resolve().name
    elif isinstance(model, str) and _REPO_ID.match(model) and not model.endswith(".gguf"):
        from kubeinfer.engine.models.hub import download_model

        path, model_id = download_model(model, revision), model
    else:
        raise ModelNotFoundError(f"model path {str(model)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"unsupported model file {path}: expected a .gguf file or a checkpoint directory")
        return load_gguf(path, model_id=model_id, **opts)
    if (path / "config.json").is_file():
        return load_hf_checkpoint(path, model_id=model_id, revision=None, **opts)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], model_id=model_id, **opts)
    raise ValueError(f"{path} holds no config.json and no single .gguf file: not a model checkpoint")


def build_model(cfg: ModelConfig, device: torch.device, tp_rank: int = 0, tp_size: int = 1) -> LlamaForCausalLM:
    """An uninitialised model with its parameters already in ``cfg.dtype`` on ``device``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, tp_rank, tp_size)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def load_hf_checkpoint(path: Path, *, model_id: str, dtype: str | torch.dtype, device: torch.device,
                       revision: str | None = None, tp_rank: int = 0, tp_size: int = 1,
                       quantization: str | None = None) -> LoadedModel:
    """A Hugging Face checkpoint folder: config.json + *.safetensors + tokenizer files; ``quantization``
    ``int8`` quantizes the linear layers' weights to int8 rows as they load; an AWQ/GPTQ checkpoint (its
    ``quantization_config``) keeps its 4-bit linear weights, repacked as Q4_1 rows (``awq_gptq.py``)."""
    raw = json.loads((path / "config.json").read_text())
    check_architecture((raw.get("architectures") or [None])[0])
    hf_config = AutoConfig.from_pretrained(str(path))
    tokenizer = load_tokenizer(path, revision=revision)
    generation = path / "generation_config.json"
    generation_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    qc = quantization_config(path, raw)
    method = resolve_method(quantization, "hf", device, checkpoint_method(qc))
    torch_dtype = resolve_dtype(dtype, getattr(hf_config, "dtype", None) or raw.get("torch_dtype"), device,
                                quantized=method != "none")
    eos = end_of_generation_ids(tokenizer, raw.get("eos_token_id"), generation_eos)
    cfg = ModelConfig.from_hf(hf_config, torch_dtype, eos)
    weights: Iterator[tuple[str, torch.Tensor | QuantizedRows]] = iter_safetensors(path)
    if method in PREQUANTIZED:
        weights = iter_int4_weights(weights, parse_spec(qc))
    model = build_model(cfg, device, tp_rank, tp_size)
    prepare_model(model, method)
    model.load_weights(weights)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, model_id=model_id, quantization=method)


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, read lazily one at a time."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:  # skip Mistral-style duplicate "consolidated" files
        files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("consolidated"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights (other weight formats are not supported)")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)
