"""Compile ``cpu_kernels.cpp`` once per (source, compiler flags, CPU) and load it with ctypes.

The library is built for the machine it runs on (``-march=native``) into a cache directory
(``$KUBEINFER_CACHE_DIR`` or ``~/.cache/kubeinfer/cpu-kernels``) and reused by every later process.
It has no torch headers, so a build takes about a second. When no C++ compiler is found, or the
build fails, ``load()`` returns None and the engine uses the plain-torch ops instead (logged once).
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

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared",
         "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("KUBEINFER_CACHE_DIR") or Path.home() / ".cache" / "kubeinfer"
    return Path(root) / "cpu-kernels"


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


def build(compiler: str) -> Path:
    """The path of the compiled library, building it when this source/flags/CPU has no cached copy."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_signature()]).encode()).hexdigest()
    target = cache_dir() / f"kubeinfer_cpu_{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True,
                       text=True)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@cache
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be built here (the caller falls back to torch)."""
    import torch  # noqa: F401  (torch's libgomp must be loaded first: the kernels then share its thread pool)

    compiler = _compiler()
    if compiler is None:
        logger.warning("no C++ compiler found: CPU kernels disabled, using plain torch ops")
        return None
    try:
        return ctypes.CDLL(str(build(compiler)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("building the CPU kernels failed, using plain torch ops: %s", detail.strip()[-2000:])
        return None
