"""The CPU kernels' work pool (engine/csrc/work_pool.h), seen from outside the process's kernels: one set of
helper threads for both kernel libraries, helpers that spin after a job and sleep once parked, the results
of many threads' concurrent calls, and the OpenMP mode a model with dense linears in torch gets.

Each check runs in a fresh interpreter: the pool's helpers live as long as the process, and another test's
kernels (or its thread count) would already have started them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from kubeinfer.engine.layers import cpu_kernels, quant_kernels
from kubeinfer.engine.models.loader import load_model

from tests.engine.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not (cpu_kernels.available() and quant_kernels.available()),
                                reason="the CPU kernels did not build")

PRELUDE = textwrap.dedent("""
    import time
    from pathlib import Path

    import numpy as np
    import torch
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize
    from kubeinfer.engine.layers import cpu_kernels, quant_kernels

    torch.set_num_threads(2)

    def helpers():
        '''The pool's helper threads: thread id -> scheduler state (R running or runnable, S sleeping).'''
        found = {}
        for task in Path("/proc/self/task").iterdir():
            try:
                name, stat = (task / "comm").read_text().strip(), (task / "stat").read_text()
            except OSError:
                continue  # (a thread that just ended)
            if name == "kubeinfer-pool":
                found[task.name] = stat.rsplit(")", 1)[1].split()[0]
        return found

    def quantized_matmul():
        rng = np.random.default_rng(0)
        weight = torch.from_numpy(quantize(rng.standard_normal((4096, 576)).astype(np.float32) * 0.05,
                                           GGMLQuantizationType.Q4_1))
        x = torch.from_numpy(rng.standard_normal((1, 576)).astype(np.float32))
        return quant_kernels.matmul(x, quant_kernels.Q4_1, weight, 576, activations="q8")

    def small_linear():
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(1, 576, generator=generator), torch.randn(2048, 576, generator=generator)
        return cpu_kernels.linear(x, w, num_threads=2)
""")


def run_script(body: str, env: dict[str, str] | None = None) -> str:
    import os

    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_both_libraries_run_on_one_set_of_helpers() -> None:
    out = run_script("""
        quantized_matmul()
        small_linear()
        quantized_matmul()
        print(len(helpers()))
    """)
    assert out.split() == ["1"], "two threads asked for: one helper, whichever library's kernel ran"


def test_parked_helpers_sleep_at_once_and_unparked_ones_spin() -> None:
    # A spin of 30 s: only a park can put the helper to sleep within the test.
    out = run_script("""
        small_linear()
        time.sleep(0.2)
        print(*helpers().values())
        cpu_kernels.park_workers()
        time.sleep(0.2)
        print(*helpers().values())
        small_linear()  # a parked helper still takes the next job
        quantized_matmul()
        time.sleep(0.2)
        print(*helpers().values())
    """, env={"KUBEINFER_POOL_SPIN_US": "30000000"})
    spinning, parked, woken = out.splitlines()
    assert spinning == "R"
    assert parked == "S"
    assert woken == "R"


def test_concurrent_callers_get_their_own_results() -> None:
    out = run_script("""
        from concurrent.futures import ThreadPoolExecutor

        expected_q, expected_l = quantized_matmul(), None
        torch.manual_seed(1)
        xs = [torch.randn(3, 576) for _ in range(8)]
        w = torch.randn(1024, 576)
        expected_l = [cpu_kernels.linear(x, w, num_threads=2) for x in xs]

        def call(i):
            return quantized_matmul() if i % 2 else cpu_kernels.linear(xs[i // 2 % 8], w, num_threads=2)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, range(64)))
        for i, r in enumerate(results):
            want = expected_q if i % 2 else expected_l[i // 2 % 8]
            assert torch.equal(r, want), i
        print("ok")
    """)
    assert out.split() == ["ok"]


def test_openmp_mode_gives_the_same_results_on_torchs_threads() -> None:
    out = run_script("""
        on_pool = quantized_matmul(), small_linear()
        assert len(helpers()) == 1
        cpu_kernels.park_workers()
        assert cpu_kernels.use_openmp_threads(True) is False
        on_openmp = quantized_matmul(), small_linear()
        assert all(torch.equal(a, b) for a, b in zip(on_pool, on_openmp))
        time.sleep(0.3)
        print(*helpers().values())  # the pool's helper stayed asleep (a job would have it spin for 30 s)
    """, env={"KUBEINFER_POOL_SPIN_US": "30000000"})
    assert out.split() == ["S"]


def test_the_loader_puts_a_dense_model_on_openmp_and_a_quantized_one_on_the_pool(tmp_path) -> None:
    previous = cpu_kernels.use_openmp_threads(False)
    try:
        load_model(str(make_tiny_checkpoint("llama", tmp_path / "dense")), dtype="float32")
        assert cpu_kernels.use_openmp_threads(False) is True
        load_model(None, dtype="float32", quantization="gguf")
        assert cpu_kernels.use_openmp_threads(False) is False
    finally:
        cpu_kernels.use_openmp_threads(previous)
