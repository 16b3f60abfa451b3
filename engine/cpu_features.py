"""The CPU's features, read once, and every CPU-dependent choice the engine makes from them.

Machines of one kind come with different x86 CPUs (AVX2-only AMD Zen 3, AVX-512 + BF16 Zen 5, Intel
Sapphire Rapids with AMX), so nothing may assume the CPU it was written on. The flags come from
``/proc/cpuinfo`` (``$KUBEINFER_CPU_FLAGS``, space- or comma-separated, replaces them: tests fake a CPU
class that way, or pass ``flags=`` to the decision functions). The decisions are pure functions of
the flags, so one machine can check the choices made for every CPU class.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

FLAGS_ENV = "KUBEINFER_CPU_FLAGS"
VENDOR_ENV = "KUBEINFER_CPU_VENDOR"  # replaces /proc/cpuinfo's vendor_id (AuthenticAMD, GenuineIntel), as the flags

# Kernel variants of engine/csrc, best first: the instruction sets each needs (Linux cpuinfo names).
KERNEL_VARIANTS: dict[str, frozenset[str]] = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "scalar": frozenset(),
}


def _cpuinfo_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


@cache
def detected_flags() -> frozenset[str]:
    """The real CPU's flags from ``/proc/cpuinfo`` (ignores the override: what code may execute)."""
    return frozenset(_cpuinfo_field("flags").split())


def flags() -> frozenset[str]:
    """The CPU's feature flags (``$KUBEINFER_CPU_FLAGS`` when set, else ``/proc/cpuinfo``'s, read once)."""
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        return frozenset(override.replace(",", " ").split())
    return detected_flags()


def vendor() -> str:
    """``vendor_id`` from ``/proc/cpuinfo`` (``$KUBEINFER_CPU_VENDOR`` when set): some choices depend on how a
    vendor's cores execute an instruction, which the flags do not say."""
    return os.environ.get(VENDOR_ENV) or _detected_vendor()


@cache
def _detected_vendor() -> str:
    return _cpuinfo_field("vendor_id")


@cache
def model_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _given(given: frozenset[str] | set[str] | None) -> frozenset[str]:
    return flags() if given is None else frozenset(given)


def has_fast_bf16(given: frozenset[str] | set[str] | None = None) -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matmuls are then faster than float32 (native bf16 dot products)."""
    f = _given(given)
    return "avx512_bf16" in f or "amx_bf16" in f


def quantized_int8_panels(given: frozenset[str] | set[str] | None = None) -> bool:
    """The quantized kernels' int8 panel GEMM (engine/csrc/quant_kernels.cpp: vpdpbusd on AVX-512 BW/VL and
    VNNI, vpmaddubsw on AVX2), which makes int8 activations their default for GGUF weights
    (quant_kernels.default_activations)."""
    return {"avx2", "fma", "f16c"} <= _given(given)


def quantized_vnni_int8(given: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the int8 products run on vpdpbusd (AVX-512 BW/VL and VNNI). Without it (AVX2's vpmaddubsw) an
    8-bit weight code times an int8 activation can saturate the int16 pair sums, so 8-bit formats split their
    codes into nibbles: twice the work, and float32 activations win from two rows on
    (quant_kernels.default_activations)."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _given(given)


def quantized_bf16_dot(given: frozenset[str] | set[str] | None = None, cpu_vendor: str | None = None) -> bool:
    """Whether the quantized kernels' bf16 path (AVX-512 BW/VL, VNNI and BF16: dequantised weight panels
    rounded to bf16 and multiplied with vdpbf16ps) beats widening bf16 activations to float32. Only on AMD
    (Zen 4/5 issue vdpbf16ps at twice the FMA's products: 1.1-1.9x from 32 rows); on Intel without AMX it
    runs at the FMA's rate and the rounding is extra work (0.5-0.8x measured on an AVX-512 BF16 Xeon)."""
    f = _given(given)
    amd = (cpu_vendor or vendor()) == "AuthenticAMD"
    return amd and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"} <= f


def onednn_packs_bf16(given: frozenset[str] | set[str] | None = None) -> bool:
    """oneDNN's bf16 weight reorder needs AVX-NE-CONVERT or AVX-512 BW/VL/DQ (torch raises otherwise)."""
    f = _given(given)
    return "avx_ne_convert" in f or {"avx512bw", "avx512vl", "avx512dq"} <= f


def kernel_variant(given: frozenset[str] | set[str] | None = None) -> str:
    """The best C++ kernel variant this CPU runs: ``avx512``, ``avx2`` or ``scalar``."""
    f = _given(given)
    return next(name for name, needs in KERNEL_VARIANTS.items() if needs <= f)


def supported_kernel_variants(given: frozenset[str] | set[str] | None = None) -> list[str]:
    f = _given(given)
    return [name for name, needs in KERNEL_VARIANTS.items() if needs <= f]


def describe() -> str:
    """One line for logs and benchmarks: model name, the flags that decide the engine's paths, and the C++
    kernel variant that loads (the best one, or the one ``$KUBEINFER_KERNEL_VARIANT`` forces)."""
    from kubeinfer.engine.csrc import build  # (which imports this module)

    interesting = sorted(f for f in flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    best = kernel_variant(detected_flags())  # (the build follows the real CPU, not faked flags)
    try:
        chosen = build.choose_variant()
    except ValueError:  # an unknown or unsupported forced variant: the load says so
        chosen = best
    kernels = chosen if chosen == best else f"{chosen} ({build.VARIANT_ENV}; best here {best})"
    return f"{model_name()} ({vendor()}) | {' '.join(interesting)} | kernels {kernels}"


if __name__ == "__main__":  # `python -m kubeinfer.engine.cpu_features`: what .ci/run prints
    print(f"CPU: {model_name()} ({vendor()})")
    print(f"flags: {' '.join(sorted(flags()))}")
    print(f"kernel variant: {kernel_variant()}; fast bf16: {has_fast_bf16()}; oneDNN bf16 packing: "
          f"{onednn_packs_bf16()}; quantized int8 panels: {quantized_int8_panels()}; quantized bf16 dot: "
          f"{quantized_bf16_dot()}")
