"""The dtype a model runs in: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matmuls are then much faster than float32 on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str | torch.dtype, checkpoint_dtype: torch.dtype | str | None,
                  device: torch.device) -> torch.dtype:
    """``auto``: on CPU bfloat16 when the CPU has fast bf16, else float32; on GPU the checkpoint's dtype,
    with float32 checkpoints served in bfloat16."""
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise ValueError(f"unsupported dtype {requested}; use one of auto, {', '.join(DTYPES)}")
        return requested
    name = _ALIASES.get(str(requested).lower(), str(requested).lower())
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"unsupported dtype {requested!r}; use one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = DTYPES.get(checkpoint_dtype.removeprefix("torch."))
    if checkpoint_dtype in (torch.bfloat16, torch.float16):
        return checkpoint_dtype
    return torch.bfloat16
