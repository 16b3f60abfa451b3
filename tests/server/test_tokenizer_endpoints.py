"""`/tokenize`, `/detokenize`, `/tokenizer_info`, `/version` against the real server (vLLM's shapes)."""

from __future__ import annotations

import httpx
import pytest
from kubeinfer.engine.models.bundled import bundled_model_path
from kubeinfer.engine.tokenizer import load_tokenizer

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    path = bundled_model_path()
    return load_tokenizer(path.parent, gguf_file=path.name)


def test_tokenize_a_prompt(http: httpx.Client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Hello, world! Kubernetes"
    body = http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    expected = tokenizer.encode(text, add_special_tokens=True)
    assert body["tokens"] == expected and body["count"] == len(expected)
    assert body["max_model_len"] == 1024
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(expected)
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert "token_strs" not in plain or plain["token_strs"] is None


def test_tokenize_chat_matches_the_chat_endpoint(http: httpx.Client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    body = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]  # counts what the chat endpoint feeds the model
    no_prompt = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < body["count"]
    assert body["tokens"][: no_prompt["count"]] == no_prompt["tokens"]


def test_detokenize_round_trips(http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": "round trip text", "add_special_tokens": False}).json()[
        "tokens"
    ]
    assert http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json() == {
        "prompt": "round trip text"
    }


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [10**7]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/tokenize", {"messages": []}, 400, None),
    ],
)
def test_bad_requests_are_openai_errors(
    http: httpx.Client, path: str, body: dict, status: int, param: str | None
) -> None:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_tokenizer_info_has_the_special_tokens(http: httpx.Client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token == "<|im_end|>"
    assert info["bos_token"] == tokenizer.bos_token
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["model_max_length"] == 1024
    assert "{%" in info["chat_template"]


def test_version(http: httpx.Client) -> None:
    from importlib.metadata import version

    assert http.get("/version").json() == {"version": version("kubeinfer")}


def test_tokenize_chat_reads_the_rendering_fields_and_ignores_the_rest(http: httpx.Client) -> None:
    """Fields that rendering reads (tools) reach the template; a sampling field of any shape changes no token
    and is ignored, as unknown fields are (the schemathesis run once got a 500 from `"n": [[{}]]`)."""
    plain = http.post("/tokenize", json={"messages": CHAT}).json()
    with_sampling = http.post("/tokenize", json={"messages": CHAT, "n": [[{}], None], "temperature": "hot"})
    assert with_sampling.status_code == 200, with_sampling.text
    assert with_sampling.json()["tokens"] == plain["tokens"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    refused = http.post("/tokenize", json={"messages": CHAT, "tools": tools})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"  # this template has none
