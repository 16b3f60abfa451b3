"""EngineConfig: every knob of the engine, named like the `kubeinfer serve` flags (underscored)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Without a model-specific reason to go longer, CPU serving caps the context here.
DEFAULT_CPU_MAX_MODEL_LEN = 8192
DEFAULT_GPU_MAX_MODEL_LEN = 32768
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB; capped further by what max_model_len * max_num_seqs can use

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10,  # Ki, Mi, ...: Kubernetes quantities
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20, "mi": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "gi": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40, "ti": 1 << 40,
}


def parse_size(value: str | int) -> int:
    """Bytes from ``2GiB``, ``512MB``, ``1.5g`` or a plain integer."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse memory size {value!r} (examples: 2GiB, 512MiB, 1073741824)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


# --quantization values (vLLM's names, plus none: full precision); what each supports: engine/layers/quantization.py
QUANTIZATION_METHODS = ("gguf", "int8", "awq", "gptq", "fp8", "none")
QuantizationMethod = Literal["gguf", "int8", "awq", "gptq", "fp8", "none"]
# --kv-cache-dtype values: auto (the model's dtype, as vLLM) or a dtype of its own (CPU kernels: any of them)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
KvCacheDtype = Literal["auto", "float32", "bfloat16", "float16"]


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None  # None -> the bundled SmolLM2 GGUF
    served_model_name: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda if available else cpu
    max_model_len: int | None = Field(default=None, ge=1)
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    block_size: int = Field(default=16, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    kv_cache_memory: str | int | None = None  # CPU KV cache budget
    num_gpu_blocks_override: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = Field(default=1, ge=1)
    seed: int = 0
    enforce_eager: bool = False  # no CUDA graphs (GPU) or recorded steps (CPU) for decode (engine/cuda_graphs.py)
    # None: a GGUF keeps its quantized tensors on the CPU; see engine/layers/quantization.py for the rest
    quantization: QuantizationMethod | None = None
    kv_cache_dtype: KvCacheDtype = "auto"

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        allowed = ("auto", "float32", "bfloat16", "float16", "half", "float", "bf16", "fp32", "fp16")
        if value not in allowed:
            raise ValueError(f"dtype must be one of {', '.join(allowed[:4])}, got {value!r}")
        return {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32",
                "bf16": "bfloat16"}.get(value, value)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {value!r}")
        return value

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_kv_cache_memory(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_size(value)
        return value

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_size(self.kv_cache_memory)
