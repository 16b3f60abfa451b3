"""A short `bench/soak.py` run against the shared server: every kind of request gets one of its expected
statuses, and the server ends idle (no running or waiting request, no KV block in use)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubeinfer.engine.bench.soak import main as soak_main
from kubeinfer.engine.server.settings import default_max_request_body_bytes

from tests.server.helpers import API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(300)


def test_a_short_soak_leaves_nothing_behind(server: ServerProcess, tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    code = soak_main(["--base-url", server.url, "--api-key", API_KEY, "--minutes", "0.3", "--concurrency", "6",
                      "--max-request-body-bytes", str(default_max_request_body_bytes(1024)),
                      "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["unexpected"] == 0, report["first_unexpected"]
    assert report["idle_at_end"], report["end"]
    kinds = {key.split(" ")[0] for key in report["by_kind_and_status"]}
    assert {"completion", "chat-stream", "malformed"} <= kinds, kinds  # the mix really mixed
    assert report["end"]["rss_bytes"] > 0
    assert code == 0
