"""Malformed input gets a 400 that names the problem (never a 500, never an internal message)."""

from __future__ import annotations

import httpx
import pytest

from tests.server.helpers import API_KEY, ServerProcess

pytestmark = pytest.mark.timeout(300)

JSON = {"Content-Type": "application/json"}


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", rb'{"prompt": "\ud800", "max_tokens": 1}', "prompt"),
        ("/v1/completions", rb'{"prompt": ["ok", "a\udfffb"], "max_tokens": 1}', "prompt.1"),
        ("/v1/completions", rb'{"prompt": "hi", "stop": ["\ud83d"], "max_tokens": 1}', "stop.0"),
        (
            "/v1/chat/completions",
            rb'{"messages": [{"role": "user", "content": "\ud800"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]}',
            "messages.0.content.0.text",
        ),
    ],
)
def test_lone_surrogates_are_400(http: httpx.Client, path: str, body: bytes, param: str) -> None:
    error = _error(http.post(path, content=body, headers=JSON))
    assert error["code"] == "invalid_unicode" and error["param"] == param
    assert "surrogate" in error["message"]


def test_a_valid_surrogate_pair_is_fine(http: httpx.Client) -> None:
    body = rb'{"prompt": "smile \ud83d\ude00", "max_tokens": 1}'
    assert http.post("/v1/completions", content=body, headers=JSON).status_code == 200


@pytest.mark.parametrize(
    "body", [b'{"prompt": "\xff\xfe caf\xe9", "max_tokens": 1}', b'{"prompt": "hi", ', b"", b"\x00\x01"]
)
def test_invalid_utf8_or_json_is_400_with_a_code(http: httpx.Client, body: bytes) -> None:
    error = _error(http.post("/v1/completions", content=body, headers=JSON))
    assert error["code"] in ("invalid_json", "invalid_request"), error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "5"),
        ("temperature", "0.5"),
        ("stream", "true"),
        ("n", 1.5),
        ("seed", "7"),
        ("echo", 1),
        ("logprobs", True),
        ("presence_penalty", "0"),
    ],
)
def test_types_are_strict(http: httpx.Client, field: str, value: object) -> None:
    error = _error(http.post("/v1/completions", json={"prompt": "hi", field: value}))
    assert error["param"] == field and error["code"] == "invalid_request"


def test_numbers_as_numbers_still_work(http: httpx.Client) -> None:
    body = {
        "prompt": "hi",
        "max_tokens": 2,
        "temperature": 1,
        "top_p": 1,
        "seed": 3,
    }  # int for a float is fine
    assert http.post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("seed", [10**19 + 7, -(2**63) - 1, 2**63])
def test_out_of_range_seed_does_not_leak_internals(http: httpx.Client, seed: int) -> None:
    error = _error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "seed": seed}))
    assert error["param"] == "seed"
    assert "overflow" not in error["message"].lower() and "long" not in error["message"]


def test_the_largest_seed_works(http: httpx.Client) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "seed": 2**63 - 1, "n": 2, "temperature": 1}
    assert http.post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(server: ServerProcess, scheme: str) -> None:
    response = httpx.get(
        f"{server.url}/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=30
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "value", [f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer", API_KEY, f"Bearer{API_KEY}"]
)
def test_wrong_credentials_are_401(server: ServerProcess, value: str) -> None:
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": value}, timeout=30)
    assert _error(response, 401)["code"] == "invalid_api_key"


def test_unknown_route_is_openai_shaped(http: httpx.Client) -> None:
    assert _error(http.get("/v1/nothing"), 404)["code"] == "not_found"
