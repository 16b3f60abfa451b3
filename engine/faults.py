"""Test-only fault injection: makes one request fail at a chosen point of the engine step.

Off unless ``KUBEINFER_TEST_FAULTS`` is set (read once, at import), e.g.
``KUBEINFER_TEST_FAULTS="sample=1001,postprocess=1002,forward=1003"``: a request whose ``seed`` equals
the number fails at that point. Points: ``sample`` (the sampler's batched pass, so the sampler's
per-row fallback is exercised), ``postprocess`` (stop checks / detokenising / logprobs of one sequence),
``forward`` (the model runner, before the forward: the whole step fails). The seed carries the trigger
because it reaches the engine unchanged from any API. The isolation tests of the server use it.
"""

from __future__ import annotations

import os

ENV = "KUBEINFER_TEST_FAULTS"


class InjectedFault(RuntimeError):
    pass


def _parse(spec: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, seed = item.partition("=")
        points[point.strip()] = int(seed)
    return points


_POINTS = _parse(os.environ.get(ENV, ""))


def inject(point: str, seed: int | None) -> None:
    """Raise ``InjectedFault`` when ``point`` is armed for ``seed`` (a dict lookup when armed, else nothing)."""
    if _POINTS and seed is not None and _POINTS.get(point) == seed:
        raise InjectedFault(f"injected {point} fault (test hook {ENV})")
