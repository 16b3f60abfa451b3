"""`make gpu-check` without a GPU: ``hack/gpu-check.sh --dry-run`` runs its whole pipeline on the CPU.

The dry run is the real script end to end (environment, engine vs transformers with emulated CUDA graphs
over the interpreted Triton kernels, the decode benchmark, one interpreted Triton test and the collection of
every GPU test) on tiny shapes; it must pass and write its JSON and markdown report.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_holds_every_triton_file_and_every_gpu_marked_file() -> None:
    triton, marked = load_gpu_check().gpu_test_files()
    assert "tests/engine/test_triton_attention.py" in triton and "tests/engine/test_triton_engine.py" in triton
    assert "tests/engine/test_cuda_graphs.py" in marked
    assert not set(triton) & set(marked)
    assert "tests/test_gpu_check.py" not in marked  # the check never runs itself


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real check runs (make gpu-check)")
def test_without_a_gpu_the_real_check_fails_clearly(tmp_path: Path) -> None:
    run = subprocess.run(["bash", "hack/gpu-check.sh", "--out", str(tmp_path), "--skip", "tests"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "torch sees no CUDA GPU (use --dry-run)" in run.stdout
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["ok"] is False and report["stages"]["environment"]["ok"] is False


def test_dry_run_passes_end_to_end_and_writes_the_report(tmp_path: Path) -> None:
    run = subprocess.run(["bash", "hack/gpu-check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    log = (tmp_path / "gpu-check.log").read_text() if (tmp_path / "gpu-check.log").exists() else ""
    assert run.returncode == 0, run.stdout + run.stderr + log[-4000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["dry_run"] is True and report["ok"] is True
    assert report["environment"]["torch"] == torch.__version__
    stages = report["stages"]
    assert set(stages) == {"engine", "bench", "tests"} and all(s["ok"] for s in stages.values())

    runs = {(r["dtype"], r["graphs"]): r for r in stages["engine"]["runs"]}
    assert set(runs) == {("float32", "off"), ("float32", "emulated"), ("bfloat16", "off")}
    assert runs["float32", "emulated"]["graph_replays"] > 0  # decode steps went through the static buffers
    assert runs["float32", "emulated"]["exact"] == runs["float32", "emulated"]["prompts"]

    rows = stages["bench"]["rows"]
    assert {(r["batch"], r["mode"]) for r in rows} == {(b, m) for b in (1, 4)
                                                        for m in ("eager", "cuda-graphs (emulated)")}
    assert all(r["min_ms"] > 0 for r in rows)

    tests = stages["tests"]
    assert tests["passed"] == 1 and tests["failed"] == tests["errors"] == 0
    assert "tests/engine/test_cuda_graphs.py" in tests["files"]
    text = (tmp_path / "gpu-check.md").read_text()
    assert "dry run" in text and "| engine | PASS |" in text and "Engine vs transformers" in text
    assert "PASS: report in" in run.stdout

