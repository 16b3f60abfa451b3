"""Process lifecycle: `/ready` is 503 while the model loads and while draining; SIGTERM lets the
in-flight stream finish, then the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.helpers import ServerProcess

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"


# ~20 ms a token on the dev CPU: seconds of streaming, so the drain checks below happen mid-stream.
STREAM_TOKENS = 200


def test_load_then_sigterm_drains_without_cutting_the_stream(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = ServerProcess(["--drain-timeout", "60"]).start(tmp_path)
    try:
        # Loading: /health is up before /ready, and /v1 answers 503 with Retry-After.
        saw_loading_503 = False
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            health, ready = server.probe()
            if (health, ready) == (200, 503):
                response = httpx.get(f"{server.url}/v1/models")
                if response.status_code == 503:  # still loading (it may have just finished)
                    assert response.headers["Retry-After"]
                    assert response.json()["error"]["type"] == "service_unavailable"
                    saw_loading_503 = True
            if ready == 200:
                break
            time.sleep(0.05)
        assert saw_loading_503, "never saw /health 200 with /ready 503 during loading"
        assert server.probe() == (200, 200)

        # A stream is in flight when SIGTERM arrives.
        events: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {
                "model": MODEL,
                "prompt": "Once upon a time",
                "max_tokens": STREAM_TOKENS,  # long enough to still be running while the drain is checked
                "ignore_eos": True,
                "logprobs": 0,  # one token list per event: count what arrived
                "stream": True,
            }
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        events.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)

        # Draining: /ready says 503, new work is refused with 503, /health stays up.
        time.sleep(0.3)
        assert server.probe() == (200, 503)
        refused = httpx.post(
            f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}
        )
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["error"]["message"]

        reader.join(120)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        tokens = [t for c in chunks for choice in c["choices"] for t in choice["logprobs"]["tokens"]]
        assert len(tokens) == STREAM_TOKENS  # every token arrived
        assert server.process.wait(60) == 0
    finally:
        server.stop()
