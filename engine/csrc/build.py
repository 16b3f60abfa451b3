"""Compile a C++ kernel source once per (source, compiler flags, kernel variant, CPU) and load it with ctypes.

A library is built for the machine it runs on into a cache directory (``cpu-kernels`` under
``$KUBEINFER_CACHE``, the project's one cache root, default ``~/.cache/kubeinfer``, as for the hack/
scripts' builds) and reused by every later process. The sources have no torch headers, so a build takes
a second or two. When no C++ compiler is found, or the build fails,
``load()`` returns None and the engine uses the plain-torch ops instead (logged once).

Kernel variants (``cpu_features.KERNEL_VARIANTS``): one source, with ``#if`` on ``__AVX512F__`` /
``__AVX2__`` choosing the inner loops at compile time. The library is always built on the CPU that runs
it, so the variant is chosen at build time and each build holds one code path (no run-time dispatch,
no function multiversioning to keep in step). The best variant the CPU supports builds with
``-march=native``; a lower one (``$KUBEINFER_KERNEL_VARIANT=avx2|scalar``, or ``variant=`` in tests)
builds for that class's baseline ISA (``-march=x86-64-v3`` / ``x86-64``), so the fallbacks can be built
and tested on any machine that can run them. Every source exports ``int ki_variant(void)``
(0 scalar, 1 avx2, 2 avx512) so a caller can check what it loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from kubeinfer.engine import cpu_features

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
VARIANT_ENV = "KUBEINFER_KERNEL_VARIANT"
BASE_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
# Per source: cpu_kernels.cpp rounds where torch rounds, so the compiler must not fuse into FMAs.
SOURCE_FLAGS = {"cpu_kernels.cpp": ["-ffp-contract=off"]}
VARIANT_MARCH = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "scalar": "x86-64"}
VARIANT_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}


def cache_dir() -> Path:
    root = os.environ.get("KUBEINFER_CACHE") or Path.home() / ".cache" / "kubeinfer"
    return Path(root) / "cpu-kernels"


def source_text(source: Path) -> str:
    """The source and the headers beside it (what a build of it depends on, for the cache key)."""
    headers = sorted(source.parent.glob("*.h"))
    return "\n".join(path.read_text() for path in (source, *headers))


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model name and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def choose_variant(requested: str | None = None) -> str:
    """The variant to build: ``requested`` (or ``$KUBEINFER_KERNEL_VARIANT``) when the CPU runs it,
    else the best one it supports. Always the real CPU's flags (``$KUBEINFER_CPU_FLAGS`` fakes decisions,
    never code this CPU cannot execute)."""
    real = cpu_features.detected_flags()
    best = cpu_features.kernel_variant(real)
    requested = requested or os.environ.get(VARIANT_ENV, "").strip().lower() or None
    if requested is None:
        return best
    if requested not in cpu_features.KERNEL_VARIANTS:
        raise ValueError(f"unknown kernel variant {requested!r}; use one of {', '.join(cpu_features.KERNEL_VARIANTS)}")
    if requested not in cpu_features.supported_kernel_variants(real):
        missing = cpu_features.KERNEL_VARIANTS[requested] - real
        raise ValueError(f"kernel variant {requested!r} needs CPU flags this CPU lacks ({' '.join(sorted(missing))})")
    return requested


def compile_flags(variant: str, source: Path = SOURCE) -> list[str]:
    """The compiler flags for ``source`` in ``variant``: -march=native for the CPU's own best variant."""
    native = variant == cpu_features.kernel_variant(cpu_features.detected_flags())
    march = "native" if native or platform.machine() not in ("x86_64", "AMD64") else VARIANT_MARCH[variant]
    return [*BASE_FLAGS, *SOURCE_FLAGS.get(source.name, []), f"-march={march}", "-mtune=native"]


def build(compiler: str, source: Path = SOURCE, variant: str | None = None) -> Path:
    """The path of the compiled library, building it when this source/flags/variant/CPU has no cached copy."""
    variant = choose_variant(variant)
    flags = compile_flags(variant, source)
    key = hashlib.sha256("\n".join([source_text(source), compiler, variant, *flags, _cpu_signature()]).encode())
    target = cache_dir() / f"kubeinfer_{source.stem}_{variant}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", str(partial)], check=True, capture_output=True, text=True)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@cache
def load(source: Path = SOURCE, variant: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be built here (the caller falls back to torch)."""
    import torch  # noqa: F401  (torch's libgomp must be loaded first: the kernels then share its thread pool)

    compiler = _compiler()
    if compiler is None:
        logger.warning("no C++ compiler found: CPU kernels disabled, using plain torch ops")
        return None
    try:
        chosen = choose_variant(variant)
        lib = ctypes.CDLL(str(build(compiler, source, chosen)))
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("building %s failed, using plain torch ops: %s", source.name, detail.strip()[-2000:])
        return None
    logger.info("CPU kernels %s: %s variant (%s)", source.name, chosen, cpu_features.model_name())
    return lib
