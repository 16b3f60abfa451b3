"""Decode steps on the CPU replayed as a recorded list of kernel calls: the CPU's CUDA graph.

At batch 1 a decode step of a small quantized model makes ~300 calls into the C++ kernels, each 1-10 us of
work under 10-25 us of Python (module calls, wrappers, ctypes argument checks). Recording the calls of one
forward on static buffers and replaying them, raw, removes that Python (see ``cuda_graphs.DecodeGraphs``,
which owns the static buffers, the padding and the choice of batch size).

Correctness rests on the recording seeing everything the forward computes:

* every kernel call goes through the libraries' ``_lib()``, which the recorder swaps for a proxy that logs
  the function and its arguments (raw pointers, sizes, scalars) and calls it;
* a ``TorchDispatchMode`` watches every aten op the forward runs: allocations, views and conversions that
  return their input are allowed (their memory is kept alive by the recording, so the pointers stay valid),
  and so is work wrapped in ``eager_op`` (re-run in Python on each replay, writing into the same output, e.g. the embedding lookup);
  any other op means part of the step would not be replayed, so the capture fails with ``ReplayUnsupported``
  naming it and the engine keeps running decode steps eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALLOWED_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "reshape", "alias", "split",
    "split_with_sizes", "narrow", "slice", "select", "unsqueeze", "squeeze", "t", "transpose", "as_strided",
    "expand", "permute", "detach", "unbind", "arange",
}
# Conversions that are free when the tensor already has the wanted dtype/layout (they return it as is).
_NO_OP_WHEN_ALIASED = {"to", "contiguous"}


class ReplayUnsupported(RuntimeError):
    """The forward runs work the recording cannot replay (the op is named)."""


class _Recording(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Callable[[], int]] = []
        self.keep: list[Any] = []  # every tensor made during the capture: the recorded pointers stay valid
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if not self.paused and name not in _ALLOWED_OPS and not (name in _NO_OP_WHEN_ALIASED and out is args[0]):
            raise ReplayUnsupported(f"the decode forward runs {func} outside the kernels")
        self.keep.append(out)
        return out


class _RecordingLibrary:
    """Stands in for a kernel library's CDLL: each call is logged, then made."""

    def __init__(self, lib: Any, recording: _Recording) -> None:
        self._lib, self._recording = lib, recording

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self._lib, name)

        def call(*args: Any) -> Any:
            self._recording.steps.append(_bound(fn, args))
            return fn(*args)

        return call


def _bound(fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], int]:
    return lambda: fn(*args)


def _returning(value: Any) -> Callable[[], Any]:
    return lambda: value


_active: _Recording | None = None


@contextlib.contextmanager
def recording() -> Iterator[_Recording]:
    """Record the kernel calls (and ``eager_op`` work) of what runs inside; see the module docstring."""
    global _active
    from kubeinfer.engine.layers import cpu_kernels, quant_kernels

    rec = _Recording()
    libs = {module: module._lib for module in (cpu_kernels, quant_kernels)}
    for module, lib in libs.items():
        real = lib()
        module._lib = _returning(None if real is None else _RecordingLibrary(real, rec))
    _active = rec
    try:
        with rec:
            yield rec
    finally:
        _active = None
        for module, lib in libs.items():
            module._lib = lib


def eager_op(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()``; while recording, also re-run on each replay, its result copied into this one's memory."""
    rec = _active
    if rec is None:
        return fn()
    rec.paused += 1
    try:
        out = fn()
    finally:
        rec.paused -= 1
    rec.keep.append(out)

    def again() -> int:
        out.copy_(fn())
        return 0

    rec.steps.append(again)
    return out


def replay(steps: list[Callable[[], int]]) -> None:
    """Run a recording's steps (each returns a kernel's status: 0, or nonzero for rejected arguments)."""
    for step in steps:
        if step():
            raise RuntimeError("a replayed CPU kernel rejected its recorded arguments")
