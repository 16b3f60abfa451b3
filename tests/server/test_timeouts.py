"""--request-timeout: a request that runs too long is aborted and its KV blocks freed, whether its client
waits for a JSON body, reads a stream, or opened a stream and stopped reading it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.helpers import API_KEY, ServerProcess, metric, scrape, wait_for

pytestmark = pytest.mark.timeout(600)

TIMEOUT_S = 3
# Far more tokens than this machine makes in TIMEOUT_S; ignore_eos so that it cannot stop early.
LONG = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "temperature": 0}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(["--api-key", API_KEY, "--request-timeout", str(TIMEOUT_S)])
    proc.start(tmp_path_factory.mktemp("timeouts")).wait_ready()
    yield proc
    proc.stop()


def _idle(url: str) -> bool:
    samples = scrape(url)
    running = metric(samples, "vllm:num_requests_running")
    waiting = metric(samples, "vllm:num_requests_waiting")
    return running == 0 and waiting == 0 and metric(samples, "vllm:kv_cache_usage_perc") == 0


def test_a_long_request_gets_503_after_the_timeout(timed: ServerProcess) -> None:
    start = time.monotonic()
    response = httpx.post(f"{timed.url}/v1/completions", json=LONG, headers=AUTH, timeout=120)
    elapsed = time.monotonic() - start
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 15
    wait_for(lambda: _idle(timed.url), timeout=10)


def test_a_read_stream_ends_with_an_error_event(timed: ServerProcess) -> None:
    events = []
    start = time.monotonic()
    with httpx.stream("POST", f"{timed.url}/v1/completions", json={**LONG, "stream": True}, headers=AUTH,
                      timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert time.monotonic() - start < TIMEOUT_S + 15
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}  # param present (null)
    assert error["code"] == "request_timeout"
    assert len(events) > 3  # tokens came before the timeout
    wait_for(lambda: _idle(timed.url), timeout=10)


def test_a_stream_nobody_reads_frees_its_blocks(timed: ServerProcess) -> None:
    body = json.dumps({**LONG, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", timed.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast: the server blocks on send
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: metric(scrape(timed.url), "vllm:num_requests_running") == 1, timeout=30)
        start = time.monotonic()
        wait_for(lambda: _idle(timed.url), timeout=TIMEOUT_S + 20)
        freed_after = time.monotonic() - start
        # The client never read a byte and its connection is still open.
        sock.setblocking(False)
        assert sock.recv(1, socket.MSG_PEEK)
    print(f"\nunread stream: blocks freed {freed_after:.1f} s after it started running")
    assert freed_after < TIMEOUT_S + 20
