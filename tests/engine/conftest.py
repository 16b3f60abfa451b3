"""Engine fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def float32_activations() -> Iterator[None]:
    """The quantized CPU kernels multiply float32 activations (the dense result up to rounding order) whatever
    this CPU's default (int8 activations where the int8 panels run): for tests of what the weights hold, not of
    the kernels' arithmetic. Module-scoped, so it is in place before the module's engines are built (a recorded
    decode step keeps the mode it was recorded with), and set in the environment, so tensor-parallel workers
    spawned inside see it too."""
    from kubeinfer.engine.layers import quant_kernels as qk

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(qk.ACTIVATIONS_ENV, "f32")
        qk._activations_override.cache_clear()
        yield
    qk._activations_override.cache_clear()
