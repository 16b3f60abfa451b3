"""The dtype a model runs in: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``."""

from __future__ import annotations

import logging

import torch
from kubeinfer.engine import cpu_features

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}
_warned: set[str] = set()


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matmuls are then faster than float32 on this CPU."""
    return cpu_features.has_fast_bf16()


def _warn_slow_cpu_dtype(dtype: torch.dtype) -> None:
    """An explicit half-precision dtype on a CPU without native bf16 dot products: say once why it is slow."""
    if dtype not in (torch.bfloat16, torch.float16) or cpu_has_fast_bf16() or str(dtype) in _warned:
        return
    _warned.add(str(dtype))
    logger.warning(
        "--dtype %s on this CPU (%s) is slower than float32: it has no AVX-512 BF16 or AMX, so %s matmuls "
        "convert to float32 on every call%s. Use --dtype auto (float32 here) for speed; %s only halves "
        "the weights' memory.", str(dtype).removeprefix("torch."), cpu_features.model_name(),
        str(dtype).removeprefix("torch."),
        "" if cpu_features.onednn_packs_bf16() else " and oneDNN cannot prepack them (needs AVX-512 BW/VL/DQ)",
        str(dtype).removeprefix("torch."))


def resolve_dtype(requested: str | torch.dtype, checkpoint_dtype: torch.dtype | str | None,
                  device: torch.device, quantized: bool = False) -> torch.dtype:
    """``auto``: on CPU, for quantized weights float32 (their kernels take float32 activations as they are and
    quantize them to int8 themselves where AVX-512 VNNI runs; bf16 would add a conversion on each side of every
    call); for dense ones bfloat16 when the CPU has fast bf16, else float32; on GPU the checkpoint's dtype, with float32
    checkpoints served in bfloat16. An explicit half dtype on a CPU without fast bf16 is
    honoured, with one warning saying why it is slow."""
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise ValueError(f"unsupported dtype {requested}; use one of auto, {', '.join(DTYPES)}")
        chosen = requested
    else:
        name = _ALIASES.get(str(requested).lower(), str(requested).lower())
        if name not in DTYPES and name != "auto":
            raise ValueError(f"unsupported dtype {requested!r}; use one of auto, {', '.join(DTYPES)}")
        if name in DTYPES:
            chosen = DTYPES[name]
        elif device.type == "cpu":
            return torch.bfloat16 if not quantized and cpu_has_fast_bf16() else torch.float32
        else:
            if isinstance(checkpoint_dtype, str):
                checkpoint_dtype = DTYPES.get(checkpoint_dtype.removeprefix("torch."))
            return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if device.type == "cpu":
        _warn_slow_cpu_dtype(chosen)
    return chosen
