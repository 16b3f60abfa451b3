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

A replay runs the recorded kernel calls natively: each call's arguments are packed into 64-bit slots at the
end of the recording, and every run of consecutive kernel calls is one ``ki_run_program`` call into C
(``engine/csrc/packed_calls.h``), so a step pays one ctypes call and one GIL release instead of ~300 (each
~3 us, and the GIL re-acquire waits on whatever the event loop runs meanwhile). ``eager_op`` steps, and any
call whose library has no packed entry, run in Python between the native runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
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


@dataclass(frozen=True)
class KernelCall:
    """One recorded kernel call: made again from Python, or from its ``slots`` by the native runner."""

    name: str
    fn: Any  # the ctypes function
    args: tuple[Any, ...]
    packed: int | None  # the address of ``<name>_packed`` (None: the library has none)

    def __call__(self) -> int:
        return self.fn(*self.args)

    def slots(self) -> list[int] | None:
        """The arguments as the packed entry reads them (None when one cannot be packed)."""
        if self.packed is None or self.fn.argtypes is None or len(self.fn.argtypes) != len(self.args):
            return None
        slots = []
        for argtype, value in zip(self.fn.argtypes, self.args, strict=True):
            if argtype is ctypes.c_float and isinstance(value, (int, float)):
                slots.append(struct.unpack("<I", struct.pack("<f", value))[0])
            elif value is None or isinstance(value, int):
                slots.append((value or 0) & 0xFFFF_FFFF_FFFF_FFFF)
            else:
                return None
        return slots


class _NativeRun:
    """Consecutive kernel calls as one program for ``ki_run_program``."""

    def __init__(self, calls: list[KernelCall], slots: list[list[int]], runner: Any) -> None:
        self.names = [call.name for call in calls]
        words = [word for call, args in zip(calls, slots, strict=True) for word in (call.packed, len(args), *args)]
        self.program = np.array(words, dtype=np.uint64)
        self._address, self._runner = self.program.ctypes.data, runner

    def __call__(self) -> int:
        failed = self._runner(self._address, self.program.size)
        if failed:
            raise RuntimeError(f"a replayed CPU kernel ({self.names[failed - 1]}) rejected its recorded arguments")
        return 0


class _Recording(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Callable[[], int]] = []  # KernelCalls and eager_op re-runs, in order
        self.keep: list[Any] = []  # every tensor made during the capture: the recorded pointers stay valid
        self.paused = 0
        self.segments: list[Callable[[], int]] = []  # what a replay runs: native runs and Python steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if not self.paused and name not in _ALLOWED_OPS and not (name in _NO_OP_WHEN_ALIASED and out is args[0]):
            raise ReplayUnsupported(f"the decode forward runs {func} outside the kernels")
        self.keep.append(out)
        return out

    def compile(self, runner: Any) -> None:
        """Group the steps into native runs (``runner``: ``ki_run_program``; None: every step in Python)."""
        self.segments = []
        calls: list[KernelCall] = []
        slots: list[list[int]] = []

        def flush() -> None:
            if calls:
                self.segments.append(_NativeRun(list(calls), list(slots), runner))
                calls.clear()
                slots.clear()

        for step in self.steps:
            packed = step.slots() if runner is not None and isinstance(step, KernelCall) else None
            if packed is None:
                flush()
                self.segments.append(step)
            else:
                calls.append(step)
                slots.append(packed)
        flush()


class _RecordingLibrary:
    """Stands in for a kernel library's CDLL: each call is logged, then made."""

    def __init__(self, lib: Any, recording: _Recording) -> None:
        self._lib, self._recording = lib, recording

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn, packed = getattr(self._lib, name), _packed_address(self._lib, name)

        def call(*args: Any) -> Any:
            self._recording.steps.append(KernelCall(name, fn, args, packed))
            return fn(*args)

        return call


def _packed_address(lib: Any, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, f"{name}_packed"), ctypes.c_void_p).value
    except AttributeError:
        return None


@cache
def _runner() -> Any:
    from kubeinfer.engine.layers import cpu_kernels

    lib = cpu_kernels._lib()
    return None if lib is None else lib.ki_run_program


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
    rec.compile(_runner())


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


def replay(recorded: _Recording) -> None:
    """Run a recording again: its native runs and Python steps, in order."""
    for segment in recorded.segments:
        if segment():
            raise RuntimeError("a replayed CPU kernel rejected its recorded arguments")
