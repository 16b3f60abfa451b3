"""Hostile input never stalls anyone else: oversize bodies get 413 before they are parsed, prompts that
cannot fit are refused from their length, tokenisation runs off the event loop, oversize headers get 431.

Latency checks compare a small streaming request's time to first token alone and beside one big request
in flight, interleaved on the same server (bench/head_of_line.py's measurement; generous margins here: the
machine is shared).
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from kubeinfer.engine.bench.head_of_line import ATTACKS, measure
from kubeinfer.engine.server.prompts import _length_safe
from kubeinfer.engine.server.settings import default_max_request_body_bytes

from tests.server.helpers import API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(600)

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
LIMIT = default_max_request_body_bytes(1024)  # the shared server runs --max-model-len 1024
# Allowed extra median time to first token beside a big request. The target, measured by
# bench/head_of_line.py, is 100 ms; a shared 2-core machine (load ~20) adds seconds of noise, while the stalls
# this guards against were 16 s (a 20 MB body parsed and tokenised on the event loop) and ~4 s (a 1 MB prompt
# tokenised there).
MAX_DELAY_MS = 1500


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_big_requests_do_not_delay_a_small_one(server: ServerProcess, attack: str) -> None:
    result = measure(server.url, attack, rounds=5, headers=AUTH)
    assert result.statuses == [result.expected_status] * 5
    print(f"\n{attack}: TTFT alone {result.ttft_alone_ms} ms, beside it {result.ttft_beside_ms} ms (median delay "
          f"{result.delay_ms:.0f} ms); the big request took {result.big_request_ms} ms")
    assert result.delay_ms < MAX_DELAY_MS


def test_413_is_openai_shaped_and_names_the_limit(http: httpx.Client) -> None:
    response = http.post("/v1/completions", content=b"{" + b" " * LIMIT + b"}", headers=AUTH)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"]
    # Just under the limit the body is parsed as usual (here: a valid JSON body).
    body = json.dumps({"prompt": "Hi", "max_tokens": 1, "user": "x" * (LIMIT - 100)}).encode()
    assert len(body) <= LIMIT
    assert http.post("/v1/completions", content=body, headers=AUTH).status_code == 200


def test_413_is_sent_before_the_body_is_read(server: ServerProcess) -> None:
    """A client that announces 1 GB and sends nothing still gets its answer at once."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\n".encode()
            + b"Content-Length: 1000000000\r\n\r\n"
        )
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413 ")


def test_prompt_refused_from_its_length_alone(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "x" * 200_000, "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "200000 characters" in error["message"]


def test_oversize_headers_get_431(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/health", headers={"X-Big": "x" * (1 << 20)}, timeout=30)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    # The server is fine afterwards.
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_invalid_http_gets_a_400_in_the_error_shape(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_http"


def test_which_normalizers_keep_the_length_bound() -> None:
    assert _length_safe(None)
    assert _length_safe({"type": "Sequence", "normalizers": [{"type": "Prepend"}, {"type": "NFC"}]})
    assert _length_safe({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    assert not _length_safe({"type": "Replace", "pattern": {"String": " "}, "content": ""})
    assert not _length_safe({"type": "Sequence", "normalizers": [{"type": "Strip"}]})
    assert not _length_safe({"type": "BertNormalizer"})
