"""Every CPU-dependent decision, for each CPU class seen on machines of this kind, by faking the flags.

The decisions are pure functions of the flags, so a machine of one class also proves the others'
choices: AVX2-only AMD Zen 3, AVX-512 + BF16 Zen 5, Intel Sapphire Rapids with AMX, plus an AVX-512
CPU without BF16 (Skylake-SP) and a CPU with no x86 vector extensions at all.
"""

from __future__ import annotations

import logging

import pytest
import torch
from kubeinfer.engine import cpu_features
from kubeinfer.engine.csrc import build
from kubeinfer.engine.layers import onednn
from kubeinfer.engine.models import dtype as dtype_mod

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c fma bmi1 bmi2 avx2"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
AMD, INTEL = "AuthenticAMD", "GenuineIntel"
CPU_CLASSES = {
    # name: (vendor, flags, kernel variant, fast bf16 -> auto dtype, oneDNN packs bf16)
    "zen3": (AMD, BASE + " sha_ni vaes vpclmulqdq", "avx2", False, False),
    "zen5": (AMD, f"{BASE} {AVX512} avx512_bf16 avx512_vbmi avx512_vp2intersect", "avx512", True, True),
    "sapphire_rapids": (INTEL, f"{BASE} {AVX512} avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8", "avx512", True,
                        True),
    "emerald_rapids_vm": (INTEL, f"{BASE} {AVX512} avx512_bf16 avx512_fp16 avx_vnni", "avx512", True, True),  # no AMX
    "skylake_sp": (INTEL, f"{BASE} {AVX512}", "avx512", False, True),
    "no_simd": (INTEL, "fpu sse sse2", "scalar", False, False),
}
# The quantized kernels' choices: (int8 panel GEMM -> int8 activations for GGUF, bf16 dot products for bf16 ones)
QUANTIZED = {"zen3": (True, False), "zen5": (True, True), "sapphire_rapids": (True, False),
             "emerald_rapids_vm": (True, False), "skylake_sp": (True, False), "no_simd": (False, False)}
VNNI = {"zen5", "sapphire_rapids", "emerald_rapids_vm", "skylake_sp"}  # vpdpbusd for the int8 products
CPU = torch.device("cpu")


@pytest.fixture(params=sorted(CPU_CLASSES))
def cpu_class(request, monkeypatch) -> tuple[str, str, bool, bool]:
    vendor, flags, variant, fast, packs = CPU_CLASSES[request.param]
    monkeypatch.setenv(cpu_features.FLAGS_ENV, flags)
    monkeypatch.setenv(cpu_features.VENDOR_ENV, vendor)
    monkeypatch.setattr(dtype_mod, "_warned", set())
    return request.param, variant, fast, packs


def test_decisions_per_cpu_class(cpu_class) -> None:
    name, variant, fast, packs = cpu_class
    assert cpu_features.kernel_variant() == variant, name
    assert (cpu_features.quantized_int8_panels(), cpu_features.quantized_bf16_dot()) == QUANTIZED[name]
    assert dtype_mod.resolve_dtype("auto", torch.bfloat16, CPU, quantized=True) == torch.float32
    assert cpu_features.has_fast_bf16() is fast
    assert cpu_features.onednn_packs_bf16() is packs and onednn.packs(torch.bfloat16) is packs
    assert onednn.packs(torch.float32) and not onednn.packs(torch.float16)
    assert dtype_mod.resolve_dtype("auto", torch.bfloat16, CPU) == (torch.bfloat16 if fast else torch.float32)
    assert set(cpu_features.supported_kernel_variants()) >= {variant, "scalar"}


def test_explicit_bf16_without_fast_bf16_warns_once(cpu_class, caplog) -> None:
    name, _, fast, _ = cpu_class
    with caplog.at_level(logging.WARNING, logger=dtype_mod.__name__):
        for _ in range(3):
            assert dtype_mod.resolve_dtype("bfloat16", None, CPU) == torch.bfloat16
        assert dtype_mod.resolve_dtype("float32", None, CPU) == torch.float32
    warnings = [r.getMessage() for r in caplog.records]
    if fast:
        assert warnings == [], name
    else:
        assert len(warnings) == 1 and "slower than float32" in warnings[0] and "--dtype auto" in warnings[0], warnings


def test_flags_come_from_cpuinfo_unless_overridden(monkeypatch) -> None:
    monkeypatch.delenv(cpu_features.FLAGS_ENV, raising=False)
    assert cpu_features.flags() == cpu_features.detected_flags()
    monkeypatch.setenv(cpu_features.FLAGS_ENV, "avx2,fma f16c")
    assert cpu_features.flags() == {"avx2", "fma", "f16c"}
    assert cpu_features.detected_flags() != {"avx2", "fma", "f16c"} or cpu_features.kernel_variant() == "avx2"


def test_kernel_build_follows_the_real_cpu_not_the_faked_flags(monkeypatch) -> None:
    """Faked flags steer decisions, never the code built: it must run on this CPU."""
    real = cpu_features.kernel_variant(cpu_features.detected_flags())
    monkeypatch.setenv(cpu_features.FLAGS_ENV, CPU_CLASSES["sapphire_rapids"][1])
    assert build.choose_variant() == real
    assert "-march=native" in build.compile_flags(real)
    monkeypatch.setenv(build.VARIANT_ENV, "scalar")
    assert build.choose_variant() == "scalar"
    with pytest.raises(ValueError, match="unknown kernel variant"):
        build.choose_variant("sse9")
    unsupported = [v for v in cpu_features.KERNEL_VARIANTS
                   if v not in cpu_features.supported_kernel_variants(cpu_features.detected_flags())]
    for name in unsupported:
        with pytest.raises(ValueError, match="lacks"):
            build.choose_variant(name)


def test_the_description_names_the_variant_that_loads(monkeypatch) -> None:
    real = cpu_features.kernel_variant(cpu_features.detected_flags())
    monkeypatch.delenv(build.VARIANT_ENV, raising=False)
    monkeypatch.setenv(cpu_features.FLAGS_ENV, CPU_CLASSES["zen3"][1])  # faked flags build nothing else
    assert cpu_features.describe().endswith(f"| kernels {real}")
    monkeypatch.setenv(build.VARIANT_ENV, "scalar")
    expected = "scalar" if real == "scalar" else f"scalar ({build.VARIANT_ENV}; best here {real})"
    assert cpu_features.describe().endswith(f"| kernels {expected}")


@pytest.mark.skipif(build.platform.machine() != "x86_64", reason="x86 -march names")
def test_lower_variants_build_for_their_baseline_isa() -> None:
    real = cpu_features.kernel_variant(cpu_features.detected_flags())
    for variant, march in build.VARIANT_MARCH.items():
        if variant != real:
            assert f"-march={march}" in build.compile_flags(variant)
    assert "-ffp-contract=off" in build.compile_flags("avx2", build.SOURCE)
    assert "-ffp-contract=off" not in build.compile_flags("avx2", build.SOURCE.with_name("other.cpp"))


def test_quantized_activations_follow_the_cpu_class(cpu_class) -> None:
    """int8 activations for GGUF weights where the int8 panels run; float32 elsewhere and for weight-only int8."""
    from kubeinfer.engine.layers import quant_kernels as qk

    if not qk.available():
        pytest.skip("the quantized CPU kernels did not build")
    name = cpu_class[0]
    expected = "q8" if QUANTIZED[name][0] and qk.has_int8_panels() else "f32"
    assert qk.default_activations(qk.Q4_K) == expected, name
    assert qk.default_activations(qk.Q4_K, rows=32) == expected, name
    assert qk.default_activations(qk.INT8_ROW) == "f32"
    # Q8_0 (e.g. the LM head) batches: int8 only where vpdpbusd runs (in the faked flags and the kernel's path)
    vnni = cpu_features.quantized_vnni_int8() and qk.current_isa() in ("avx512_vnni", "avx512_bf16")
    assert cpu_features.quantized_vnni_int8() == (name in VNNI), name
    assert qk.default_activations(qk.Q8_0, rows=1) == expected, name
    assert qk.default_activations(qk.Q8_0, rows=2) == (expected if vnni else "f32"), name
    # packed int8 panels where every row count takes int8 activations: Q4, Q5 and the K-quants wherever the int8
    # tiles run, Q8_0 with VNNI; never weight-only int8
    for qtype in (qk.Q4_0, qk.Q4_1, qk.Q5_0, qk.Q5_1, qk.Q4_K, qk.Q5_K, qk.Q6_K):
        assert qk.packs_panels(qtype) == (expected == "q8"), (name, qtype)
    assert qk.packs_panels(qk.Q8_0) == (expected == "q8" and vnni), name
    assert not qk.packs_panels(qk.INT8_ROW), name
