"""kubeinfer's inference engine.

`from kubeinfer.engine import LLM, SamplingParams` is the offline API (vLLM's shape).
Imports are lazy so that light modules (config, sampling params) load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubeinfer.engine.llm import LLM
    from kubeinfer.engine.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kubeinfer.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kubeinfer.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from kubeinfer.engine.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(name)
