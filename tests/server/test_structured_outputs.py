"""Structured outputs and tool calls against a real server, with the official openai SDK.

The server serves the bundled SmolLM2 with a Hermes-style tool-aware template (``--chat-template``) and the
``hermes`` parser. Greedy decoding: what the model writes is its own, the grammar only decides what it may.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.helpers import API_KEY, ServerProcess
from tests.server.tool_template import TEMPLATE

pytestmark = pytest.mark.timeout(600)

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK_WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(["--api-key", API_KEY, "--max-num-seqs", "8", "--chat-template", str(TEMPLATE),
                          "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    proc.start(tmp_path_factory.mktemp("tool-server"))
    try:
        proc.wait_ready(timeout=900)  # slow on a loaded machine
        yield proc
    finally:
        proc.stop()  # also when it never got ready: no server left behind


@pytest.fixture(scope="module")
def tc(tool_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


class Color(enum.StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    favorite_color: Color
    hobbies: list[str] = Field(max_length=3)
    address: Address


def test_parse_returns_the_pydantic_object(tc: openai.OpenAI) -> None:
    completion = tc.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person named Ann who lives in Paris."}],
        response_format=Person, max_tokens=200, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert isinstance(person.favorite_color, Color) and len(person.hobbies) <= 3
    assert re.fullmatch(r"[0-9]{5}", person.address.zip_code)


def test_json_object(tc: openai.OpenAI) -> None:
    r = tc.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Reply in JSON with the keys "name" and "color" for a cat.'}],
        response_format={"type": "json_object"}, max_tokens=100, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_streamed_strict_json_schema_parses(tc: openai.OpenAI) -> None:
    schema = Person.model_json_schema()
    stream = tc.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Bob, a cook from Rome."}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        max_tokens=200, temperature=0, n=2)
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop", "stop"]
    for text in texts:
        Person.model_validate_json(text)
        jsonschema.validate(json.loads(text), schema)


def test_structured_outputs_choice_and_regex_hold_exactly(tc: openai.OpenAI) -> None:
    r = tc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                   extra_body={"structured_outputs": {"choice": ["yes", "no", "unsure"]}},
                                   max_tokens=20, temperature=1.0, seed=1, n=3)
    assert all(c.message.content in ("yes", "no", "unsure") and c.finish_reason == "stop" for c in r.choices)
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    done = tc.completions.create(model=MODEL, prompt=["Phone number: ", "Call me at"], max_tokens=30,
                                 temperature=0, extra_body={"structured_outputs": {"regex": pattern}})
    assert len(done.choices) == 2
    assert all(re.fullmatch(pattern, c.text) and c.finish_reason == "stop" for c in done.choices)
    grammar = 'root ::= "answer: " ("A" | "B" | "C")'
    g = tc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick one."}], max_tokens=10,
                                   extra_body={"structured_outputs": {"grammar": grammar}}, temperature=0)
    assert re.fullmatch(r"answer: [ABC]", g.choices[0].message.content or "")


def _check_calls(calls, names: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_required_and_named_match_the_schema(tc: openai.OpenAI) -> None:
    required = tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                          max_tokens=120, temperature=0)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    # Named: even a question about something else gets this function, with valid arguments.
    named = tc.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60, temperature=0)
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    _check_calls(choice.message.tool_calls, {"get_time"})
    # Sampled, not only greedy; one call at most without parallel_tool_calls.
    sampled = tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=7, n=2)
    for choice in sampled.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def _reassemble(stream) -> tuple[dict[int, dict[str, str]], str | None]:  # type: ignore[no-untyped-def]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                if d.function is not None:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
    return calls, finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_reassemble(tc: openai.OpenAI, tool_choice) -> None:  # type: ignore[no-untyped-def]
    whole = tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice=tool_choice,
                                       max_tokens=120, temperature=0)
    calls, finish = _reassemble(tc.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice=tool_choice, max_tokens=120, temperature=0,
        stream=True))
    assert finish == "tool_calls"
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected
    assert all(c["id"].startswith("chatcmpl-tool-") for c in calls.values())


def test_a_call_cut_by_max_tokens_is_returned_as_far_as_it_got(tc: openai.OpenAI) -> None:
    """tool_choice required with too few tokens: finish_reason length and, as OpenAI does, the call being
    written (its name, its arguments so far), whole or streamed; not an empty message that loses the reply."""
    whole = tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=0)
    first = whole.choices[0].message.tool_calls[0]
    cut_ones = 0
    for max_tokens in (10, 14, 18):
        cut = tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                         max_tokens=max_tokens, temperature=0)
        choice = cut.choices[0]
        assert choice.finish_reason == "length" and choice.message.content is None
        calls = choice.message.tool_calls or []
        streamed, finish = _reassemble(tc.chat.completions.create(
            model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", max_tokens=max_tokens,
            temperature=0, stream=True))
        assert finish == "length"
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
            (c.function.name, c.function.arguments) for c in calls]
        if calls:
            cut_ones += 1
            assert len(calls) == 1 and calls[0].function.name == first.function.name
            arguments = calls[0].function.arguments
            assert arguments == "" or (arguments.startswith("{") and arguments != first.function.arguments)
    assert cut_ones >= 1, "no max_tokens cut the reply after the call's name"


def test_tool_result_round_trips(tc: openai.OpenAI) -> None:
    first = tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK_WEATHER, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = tc.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="auto",
                                        max_tokens=40, temperature=0)
    assert answer.choices[0].message.content
    longer = answer.usage.prompt_tokens
    without = tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice="none",
                                         max_tokens=1, temperature=0)
    assert longer > without.usage.prompt_tokens + 20  # the call and its result were rendered into the prompt


def test_invalid_constraints_are_400_with_the_reason(tc: openai.OpenAI) -> None:
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format", 'Unsupported type "foo"'),
        ({"extra_body": {"structured_outputs": {"regex": "(ab"}}}, "structured_outputs", "parenthesis"),
        ({"extra_body": {"structured_outputs": {"regexp": "ab"}}}, "structured_outputs.regexp", "Extra inputs"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs", "exactly one"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
          "tool_choice": "required"}, "tools", "Unsupported type"),
    ]
    for kwargs, param, reason in bad:
        with pytest.raises(openai.BadRequestError) as info:
            tc.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=5, **kwargs)
        error = info.value.body
        assert error["param"] == param and reason in error["message"], (kwargs, error)


def test_streamed_invalid_schema_is_a_400_before_the_stream(tool_server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": ASK_WEATHER, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}
    r = httpx.post(f"{tool_server.url}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert r.status_code == 400 and "Unsupported type" in r.json()["error"]["message"]


def test_a_template_without_tools_gets_them_described_for_forced_calls(client: openai.OpenAI) -> None:
    """The default server: the bundled template never reads ``tools``. Required and named choices describe them
    in a system message and the grammar forces the calls (llama.cpp's generic tool format), as with a tool-aware
    template; auto tool choice is not enabled there."""
    required = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,
                                              tool_choice="required", max_tokens=120, temperature=0)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    named = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *ASK_WEATHER], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60, temperature=0)
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    _check_calls(choice.message.tool_calls, {"get_time"})
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, max_tokens=5)
