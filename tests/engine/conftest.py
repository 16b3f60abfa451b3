"""Engine fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def float32_activations(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The quantized CPU kernels multiply float32 activations (the dense result up to rounding order) whatever
    this CPU's default (int8 activations where the int8 panels run): for tests of what the weights hold, not of
    the kernels' arithmetic. Set in the environment, so tensor-parallel workers spawned inside see it too."""
    from kubeinfer.engine.layers import quant_kernels as qk

    monkeypatch.setenv(qk.ACTIVATIONS_ENV, "f32")
    qk._activations_override.cache_clear()
    yield
    qk._activations_override.cache_clear()
