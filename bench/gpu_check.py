"""`make gpu-check`: everything a CUDA machine must prove, in one run of under 8 minutes, one report.

Stages, each in its own process with its own time limit (a crash or hang in one still leaves a report):

1. environment: nvidia-smi, the GPU, torch / triton / transformers versions, the CPU flags;
2. engine: the engine's greedy tokens against transformers on the GPU, float32 and bfloat16, with CUDA
   graphs and with ``--enforce-eager`` (``gpu_check_engine.py``);
3. bench: decode steps at batch 1 and 64 in bfloat16, eager and CUDA graphs, for Llama-3.1-8B at its real
   shapes (random weights) and SmolLM2-135M (``gpu_check_speed.py``);
4. tests: every compiled-Triton test: the ``tests/engine/test_triton_*.py`` files (their interpreter checks
   run compiled on the GPU, ``KUBEINFER_TRITON_TESTS=compiled``, without ``TRITON_INTERPRET``) and every
   test marked ``gpu``.

It writes ``gpu-check.json`` and ``gpu-check.md`` (plus the logs) to ``--out`` and exits 0 only when every
stage passed. ``--dry-run`` runs the same pipeline on the CPU without a GPU: a tiny model, the Triton kernels
in the interpreter, CUDA graphs emulated, a few of the Triton tests (and the collection of all of them).

    hack/gpu-check.sh                    # on a CUDA machine (make gpu-check)
    hack/gpu-check.sh --out "$OUT"       # the report where the device tool copies files back from
    hack/gpu-check.sh --dry-run          # anywhere
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".kube" / "gpu-check"
GPU_BUDGET_S = 470  # the limit is 8 minutes for everything
STAGE_LIMITS_S = {"engine": 120, "bench": 90}  # tests get what is left
DRY_RUN_BUDGET_S = 1800  # on a shared CPU the interpreter can be many times slower: no GPU limit to keep
DRY_RUN_STAGE_LIMITS_S = {"engine": 600, "bench": 600}
# The dry run collects every GPU test file (they must import) and runs one interpreted check: the padded
# decode batch that CUDA graphs replay.
DRY_RUN_SELECTION = ["-k", "test_padded_decode_batch and 4"]


# --------------------------------------------------------------------------- environment


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"{cmd[0]} failed: {error}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": _version("triton"), "transformers": _version("transformers"),
        "pydantic": _version("pydantic"), "cuda_available": torch.cuda.is_available(),
        "commit": _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "nvidia_smi": _run(["nvidia-smi"]),
        "nvidia_smi_query": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                  "power.limit", "--format=csv,noheader"]),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count}
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "avx_ne_convert")
        info["cpu_flags"] = [f for f in wanted if f in flags.split()]
    except (OSError, StopIteration):
        info["cpu_flags"] = []
    info["cpu"] = platform.processor() or platform.machine()
    return info


# --------------------------------------------------------------------------- stages in their own processes


def _python() -> list[str]:
    return [sys.executable]


def run_stage(name: str, dry_run: bool, timeout: float, log: Path) -> dict[str, Any]:
    """``name`` in a child process (``--stage``): its JSON result, or a failure saying why there is none."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:  # the Triton kernels in the interpreter: set before triton is imported
        env["TRITON_INTERPRET"] = "1"
        if name == "bench":
            env["KUBEINFER_ATTENTION_BACKEND"] = "triton"
    else:
        env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [*_python(), str(Path(__file__).resolve()), "--stage", name, "--stage-result", str(result_file)]
        if dry_run:
            cmd.append("--dry-run")
        start = time.perf_counter()
        with log.open("a") as out:
            out.write(f"\n===== stage {name}: {' '.join(cmd)}\n")
            out.flush()
            try:
                code = subprocess.run(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": timeout}
        seconds = time.perf_counter() - start
        if not result_file.is_file():
            return {"ok": False, "error": f"exit code {code}, no result (see {log.name})", "seconds": seconds}
        result = json.loads(result_file.read_text())
    result["seconds"] = round(seconds, 1)
    if code != 0:
        result["ok"] = False
    return result


def stage_main(name: str, result_file: Path, dry_run: bool) -> int:
    """Inside the child: run one stage and write its result (an exception becomes a failed result)."""
    import traceback

    try:
        if name == "engine":
            import gpu_check_engine

            result = gpu_check_engine.run(dry_run)
        elif name == "bench":
            import gpu_check_speed

            result = gpu_check_speed.run(dry_run)
        else:
            raise ValueError(f"unknown stage {name!r}")
    except Exception as error:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    result_file.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok") else 1


# --------------------------------------------------------------------------- tests


def gpu_test_files() -> tuple[list[str], list[str]]:
    """(Triton test files: every test of them; other files holding tests marked ``gpu``)."""
    triton = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_triton_*.py"))
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                    if str(p.relative_to(REPO)) not in triton and "mark.gpu" in p.read_text())
    return triton, marked


def _pytest() -> list[str]:
    script = Path(sys.executable).with_name("pytest")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pytest"]


def _junit_summary(path: Path) -> dict[str, Any]:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    if not path.is_file():
        return {**counts, "failed_tests": failed, "skipped_tests": skipped}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed.append(test_id)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed.append(test_id)
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            skipped.append(f"{test_id}: {skip.get('message', '')}")
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "skipped_tests": skipped}


def run_tests(dry_run: bool, timeout: float, log: Path) -> dict[str, Any]:
    triton, marked = gpu_test_files()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env["KUBEINFER_TRITON_TESTS"] = "interpret" if dry_run else "compiled"
    if dry_run:
        runs = [[*DRY_RUN_SELECTION, *triton, *marked]]
    else:
        runs = [triton] + ([["-m", "gpu", *marked]] if marked else [])
    start = time.perf_counter()
    totals: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": [],
                              "skipped_tests": [], "files": triton + marked}
    ok = True
    with tempfile.TemporaryDirectory() as tmp, log.open("a") as out:
        for i, args in enumerate(runs):
            junit = Path(tmp) / f"junit{i}.xml"
            remaining = timeout - (time.perf_counter() - start)
            cmd = [*_pytest(), "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
            out.write(f"\n===== {' '.join(cmd)}\n")
            out.flush()
            pytest = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                code = pytest.wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:  # interrupted, pytest still writes the junit file of what ran
                totals["error"] = f"timed out after {timeout:.0f} s"
                pytest.send_signal(signal.SIGINT)
                try:
                    pytest.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pytest.kill()
                    pytest.wait()
                code = -1
            summary = _junit_summary(junit)
            for key in ("passed", "failed", "errors", "skipped"):
                totals[key] += summary[key]
            totals["failed_tests"] += summary["failed_tests"]
            totals["skipped_tests"] += summary["skipped_tests"]
            ok = ok and code == 0
    totals["ok"] = ok and totals["failed"] == 0 and totals["errors"] == 0 and totals["passed"] > 0
    totals["seconds"] = round(time.perf_counter() - start, 1)
    return totals


# --------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    env, stages = report["environment"], report["stages"]
    gpu = env.get("gpu") or {}
    lines = [f"# kubeinfer GPU check{' (dry run on the CPU)' if report['dry_run'] else ''}", "",
             f"- date: {env['date']}, commit {env.get('commit')}, total {report['seconds']:.0f} s",
             f"- GPU: {gpu.get('name', 'none')} (sm_{gpu.get('capability', '-').replace('.', '')}, "
             f"{gpu.get('memory_gib', '-')} GiB, {gpu.get('sms', '-')} SMs); nvidia-smi: "
             f"{env.get('nvidia_smi_query') or 'not available'}",
             f"- torch {env['torch']} (CUDA {env.get('torch_cuda')}), triton {env['triton']}, "
             f"transformers {env['transformers']}, Python {env['python']}; CPU flags: {' '.join(env['cpu_flags'])}",
             "", "| stage | result | seconds | detail |", "| --- | --- | ---: | --- |"]
    for name, result in stages.items():
        detail = result.get("error", "")
        if name == "tests":
            detail = (f"{result.get('passed', 0)} passed, {result.get('failed', 0)} failed, "
                      f"{result.get('errors', 0)} errors, {result.get('skipped', 0)} skipped {detail}")
        lines.append(f"| {name} | {'PASS' if result.get('ok') else 'FAIL'} | {result.get('seconds', 0):.0f} | "
                     f"{detail.strip()} |")
    engine = stages.get("engine", {})
    if engine.get("runs"):
        lines += ["", "## Engine vs transformers (greedy tokens)", "",
                  "| model | dtype | CUDA graphs | prompts | exact | within top-5 | graph replays | needs | result |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in engine["runs"]:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['graphs']} | {r['prompts']} | {r['exact']} | "
                         f"{r['close']} | {r['graph_replays']} | {r['required']} | {'PASS' if r['ok'] else 'FAIL'} |")
        lines += [f"- {note}" for note in engine.get("notes", [])]
    bench = stages.get("bench", {})
    if bench.get("rows"):
        rate, context = bench.get("copy_bytes_per_s"), bench["rows"][0]["context"]
        lines += ["", f"## Decode steps (forward + logits, contexts in [{context // 2}, {context}])", "",
                  f"Device-to-device copy rate: {rate / 1e12:.2f} TB/s (read + written)." if rate else
                  "No copy rate: not on a GPU.", "",
                  "| model | weights | dtype | batch | mode | min ms | median ms | tok/s | floor ms | × floor |",
                  "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in bench["rows"]:
            floor = r.get("floor_ms")
            floor_ms, times_floor = (f"{floor:.2f}", f"{r['min_ms'] / floor:.2f}") if floor else ("-", "-")
            lines.append(f"| {r['model']} | {r['weights']} | {r['dtype']} | {r['batch']} | {r['mode']} | "
                         f"{r['min_ms']:.2f} | {r['median_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{floor_ms} | {times_floor} |")
        lines += ["", f"_{bench.get('note', '')}_"]
    tests = stages.get("tests", {})
    if tests.get("failed_tests"):
        lines += ["", "## Failed tests", ""] + [f"- `{t}`" for t in tests["failed_tests"]]
    if tests.get("skipped_tests"):
        lines += ["", "## Skipped tests", ""] + [f"- `{t}`" for t in tests["skipped_tests"][:50]]
    lines += ["", "## nvidia-smi", "", "```", env.get("nvidia_smi") or "not available", "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: the same pipeline on the CPU, tiny shapes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--skip", action="append", default=[], choices=["engine", "bench", "tests"],
                        help="leave a stage out (repeatable)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for everything (default {GPU_BUDGET_S}; dry run {DRY_RUN_BUDGET_S})")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return stage_main(args.stage, args.stage_result, args.dry_run)

    start = time.perf_counter()
    budget = args.budget or (DRY_RUN_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    stage_limits = DRY_RUN_STAGE_LIMITS_S if args.dry_run else STAGE_LIMITS_S
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu-check.log"
    log.write_text("")
    env = environment()
    print(f"GPU check{' (dry run, CPU only)' if args.dry_run else ''}: torch {env['torch']} "
          f"(CUDA {env['torch_cuda']}), triton {env['triton']}, transformers {env['transformers']}, "
          f"CPU flags {' '.join(env['cpu_flags'])}")
    print(env.get("nvidia_smi") or "nvidia-smi: not available")
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": env, "stages": {}}
    if not args.dry_run and not env["cuda_available"]:
        report["stages"]["environment"] = {"ok": False, "error": "torch sees no CUDA GPU (use --dry-run)"}
    else:
        for name in ("engine", "bench", "tests"):
            if name in args.skip:
                continue
            left = budget - (time.perf_counter() - start)
            print(f"--- {name} (at most {left if name == 'tests' else min(left, stage_limits[name]):.0f} s)",
                  flush=True)
            if name == "tests":
                result = run_tests(args.dry_run, max(left - 5, 30), log)
            else:
                result = run_stage(name, args.dry_run, max(min(left, stage_limits[name]), 30), log)
            report["stages"][name] = result
            print(f"    {'PASS' if result.get('ok') else 'FAIL'} in {result.get('seconds', 0):.0f} s "
                  f"{result.get('error', '')}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["ok"] = bool(report["stages"]) and all(r.get("ok") for r in report["stages"].values())
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (args.out / "gpu-check.md").write_text(text)
    print(text.split("\n## nvidia-smi")[0])
    print(f"{'PASS' if report['ok'] else 'FAIL'}: report in {args.out}/gpu-check.md and gpu-check.json "
          f"({report['seconds']:.0f} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
