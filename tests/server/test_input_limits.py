"""Hostile input never stalls anyone else: oversize bodies get 413 before they are parsed, prompts that
cannot fit are refused from their length, tokenisation runs off the event loop, oversize headers get 431.

Latency checks compare a small streaming request's time to first token alone and beside one big request
in flight, interleaved on the same server (generous margins: the machine is shared).
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from kubeinfer.engine.server.prompts import _length_safe
from kubeinfer.engine.server.settings import default_max_request_body_bytes

from tests.server.helpers import API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(600)

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
LIMIT = default_max_request_body_bytes(1024)  # the shared server runs --max-model-len 1024
# Allowed extra median time to first token beside a big request. The target on a quiet machine is 0.1 s;
# this shared 2-core machine (load ~20) adds seconds of noise, while the stalls this guards against were
# 16 s (a 20 MB body parsed and tokenised on the event loop) and ~4 s (a 1 MB prompt tokenised there).
MAX_DELAY_S = 1.5


def _first_token_s(url: str) -> float:
    body = {"prompt": "Count: one, two,", "max_tokens": 2, "temperature": 0, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                return time.monotonic() - start
    raise AssertionError("no token streamed")


def _beside(url: str, send: Callable[[httpx.Client], int]) -> tuple[float, int, float]:
    """TTFT of a small request sent while one big request (started just before) is in flight."""
    result: dict[str, float] = {}

    def big() -> None:
        with httpx.Client(timeout=120) as client:
            start = time.monotonic()
            result["status"] = send(client)
            result["duration"] = time.monotonic() - start

    thread = threading.Thread(target=big, daemon=True)
    thread.start()
    time.sleep(0.02)
    ttft = _first_token_s(url)
    thread.join(120)
    return ttft, int(result["status"]), result["duration"]


def _completion(url: str, prompt_chars: int) -> Callable[[httpx.Client], int]:
    body = json.dumps({"prompt": "hello world " * (prompt_chars // 12), "max_tokens": 1}).encode()
    return lambda c: c.post(f"{url}/v1/completions", content=body, headers=AUTH).status_code


def _chunked_completion(url: str, size: int) -> Callable[[httpx.Client], int]:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(size // (1 << 20)):
            yield b"a" * (1 << 20)
        yield b'", "max_tokens": 1}'

    return lambda c: c.post(f"{url}/v1/completions", content=chunks(), headers=AUTH).status_code


def _chat(url: str, content_chars: int) -> Callable[[httpx.Client], int]:
    messages = [{"role": "user", "content": "hello world " * (content_chars // 12)}]
    body = json.dumps({"messages": messages, "max_tokens": 1}).encode()
    return lambda c: c.post(f"{url}/v1/chat/completions", content=body, headers=AUTH).status_code


ATTACKS = {
    # what it sends: (the request, the status it must get)
    "20MB body": (lambda url: _completion(url, 20_000_000), 413),
    "20MB chunked body": (lambda url: _chunked_completion(url, 20 << 20), 413),
    "1MB prompt": (lambda url: _completion(url, 1_000_000), 400),
    "1MB chat message": (lambda url: _chat(url, 1_000_000), 400),
    "80kB prompt (tokenised)": (lambda url: _completion(url, 80_000), 400),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_big_requests_do_not_delay_a_small_one(server: ServerProcess, attack: str) -> None:
    make, expected = ATTACKS[attack]
    send = make(server.url)
    _first_token_s(server.url)  # warm up
    alone, beside, big = [], [], []
    for _ in range(5):  # interleaved, so that the machine's load drifts equally over both
        alone.append(_first_token_s(server.url))
        ttft, status, duration = _beside(server.url, send)
        assert status == expected
        beside.append(ttft)
        big.append(duration)
    delay = statistics.median(beside) - statistics.median(alone)
    print(
        f"\n{attack}: TTFT alone {[round(s, 3) for s in alone]} s, beside it {[round(s, 3) for s in beside]} s "
        f"(median delay {delay * 1000:.0f} ms); the big request took {[round(s, 3) for s in big]} s"
    )
    assert delay < MAX_DELAY_S


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
