"""A tensor-parallel worker killed mid-generation (2 ranks, gloo): found within 5 s, the request in flight
fails with a clear error, and the server exits non-zero (so that Kubernetes restarts the pod)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.engine.tiny_models import make_tiny_checkpoint
from tests.server.helpers import ServerProcess

pytestmark = pytest.mark.timeout(600)

DETECTION_S = 5


def _worker_pids(server_pid: int) -> list[int]:
    """The server's spawned TP workers (not multiprocessing's resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server_pid and b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def tp_server(tmp_path: Path) -> Iterator[ServerProcess]:
    model = make_tiny_checkpoint("llama", tmp_path / "tiny")
    proc = ServerProcess(
        ["--model", str(model), "--tensor-parallel-size", "2", "--dtype", "float32", "--max-model-len", "512"]
    )
    proc.start(tmp_path).wait_ready()
    yield proc
    proc.stop()


def test_a_killed_worker_fails_the_request_and_the_server_exits(tp_server: ServerProcess) -> None:
    assert tp_server.process is not None
    [worker] = _worker_pids(tp_server.process.pid)
    body = {"prompt": "hello", "max_tokens": 500, "ignore_eos": True, "stream": True, "temperature": 0}
    events: list[str] = []
    with httpx.stream("POST", f"{tp_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break  # generating
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                if "error" in events[-1]:
                    break
        failed_after = time.monotonic() - killed
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    print(f"\nworker killed: the stream's error came {failed_after:.2f} s later: {errors}")
    assert errors, f"no error event after the worker died: {events[-3:]}"
    assert "worker" in errors[0]["message"] or "engine" in errors[0]["message"]
    assert failed_after < DETECTION_S
    code = tp_server.process.wait(30)
    print(f"server exit code {code}, {time.monotonic() - killed:.1f} s after the kill")
    assert code != 0
    assert "died" in tp_server.log(tail=None)  # gloo's own long error message follows ours
