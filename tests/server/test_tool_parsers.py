"""Tool-call parsers and the tool-call stream builder on recorded replies of each format (no server)."""

from __future__ import annotations

import json

import pytest
from kubeinfer.engine.server.chat_template import conversation, render_chat, template_reads
from kubeinfer.engine.server.errors import OpenAIError
from kubeinfer.engine.server.protocol import ChatCompletionRequest, ChatMessage
from kubeinfer.engine.server.tools.output import ChoiceTools
from kubeinfer.engine.server.tools.parsers import ParsedToolCall, get_tool_parser
from kubeinfer.engine.server.tools.plan import described_tools, plan_tools, tool_definitions

from tests.engine.tiny_models import CHATML, make_tiny_tokenizer
from tests.server.tool_template import TEMPLATE

WEATHER = ParsedToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ParsedToolCall("get_time", '{"tz": "UTC"}')

# Replies as the models write them (Hermes 2 Pro / Qwen2.5, Llama 3.1, Mistral 7B v0.3 Instruct).
RECORDED = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
         None, [WEATHER]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>',
         "Let me check.", [WEATHER, TIME]),
        ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}', None, [TIME]),  # stopped before closing
        ("It is sunny in Paris.", "It is sunny in Paris.", []),
        ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ],
    "qwen": [
        ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>', None, [TIME]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [WEATHER]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
         '{"name": "get_time", "parameters": {"tz": "UTC"}}', None, [WEATHER, TIME]),
        ("The weather is fine.", "The weather is fine.", []),
        ('{"name": "get_time", "parameters": {"tz": ', '{"name": "get_time", "parameters": {"tz": ', []),
    ],
    "mistral": [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', None, [WEATHER]),
        ('Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
         '{"name": "get_time", "arguments": {"tz": "UTC"}}]', "Sure.", [WEATHER, TIME]),
        ("No tools needed.", "No tools needed.", []),
    ],
}
CASES = [(name, *case) for name, cases in RECORDED.items() for case in cases]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_extract(parser: str, text: str, content: str | None, calls: list[ParsedToolCall]) -> None:
    extracted = get_tool_parser(parser).extract(text)
    assert extracted.content == content
    assert [(c.name, json.loads(c.arguments)) for c in extracted.calls] == [
        (c.name, json.loads(c.arguments)) for c in calls]


def _auto_plan(parser: str):  # type: ignore[no-untyped-def]
    request = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                  for n in ("get_weather", "get_time")]})
    return plan_tools(request, enable_auto_tool_choice=True, tool_call_parser=parser)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_streamed_deltas_reassemble(parser: str, text: str, content: str | None,
                                    calls: list[ParsedToolCall]) -> None:
    """Feeding the reply a few characters at a time gives the same content and calls as the whole reply."""
    tools = ChoiceTools(_auto_plan(parser))
    streamed_content = ""
    streamed: dict[int, dict[str, str]] = {}
    for end in [*range(3, len(text), 3), len(text)]:
        piece, deltas = tools.delta(text[:end], finished=end == len(text))
        streamed_content += piece or ""
        for d in deltas:
            call = streamed.setdefault(d.index, {"name": "", "arguments": "", "id": ""})
            call["id"] = d.id or call["id"]
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert (streamed_content.strip() or None) == content or (not calls and streamed_content == text)
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == [
        (c.name, json.loads(c.arguments)) for c in calls]
    assert all(c["id"] for c in streamed.values())
    assert tools.finish_reason("stop", tools.has_calls) == ("tool_calls" if calls else "stop")


def test_content_that_only_looks_like_a_marker_start_is_sent_in_the_end() -> None:
    tools = ChoiceTools(_auto_plan("hermes"))
    assert tools.delta("a < b <tool", finished=False) == ("a < b ", [])
    assert tools.delta("a < b <tool", finished=True) == ("<tool", [])


def test_template_tool_support_is_detected() -> None:
    assert template_reads(TEMPLATE.read_text(), "tools")
    assert not template_reads(CHATML, "tools")
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(OpenAIError, match="does not support tools"):
        render_chat(tokenizer, [ChatMessage(role="user", content="hi")], override=None,
                    tools=[{"type": "function", "function": {"name": "f"}}], add_generation_prompt=True)


def test_a_template_without_tools_gets_the_described_tools_in_its_system_message() -> None:
    tokenizer = make_tiny_tokenizer()
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    instructions = described_tools(request)
    assert instructions is not None and "get_time" in instructions and "Time in a timezone" in instructions
    text = render_chat(tokenizer, request.messages, override=CHATML, tools=tool_definitions(request),
                       add_generation_prompt=True, tool_instructions=instructions)
    assert text.count("<|im_start|>system") == 1  # appended to the conversation's own system message
    assert "Be brief.\n\nYou can call this tool" in text and "Call get_time" in text
    alone = render_chat(tokenizer, request.messages[1:], override=CHATML, tools=tool_definitions(request),
                        add_generation_prompt=True, tool_instructions=instructions)
    assert alone.startswith("<|im_start|>system\nYou can call this tool")
    # auto (or none) has nothing the grammar forces: no description
    assert described_tools(request.model_copy(update={"tool_choice": "auto"})) is None


def test_tool_calls_and_results_round_trip_through_the_template() -> None:
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]]
    turns = conversation(messages)
    assert turns[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert turns[2]["tool_call_id"] == "call_1"
    text = render_chat(make_tiny_tokenizer(), messages, override=TEMPLATE.read_text(),
                       tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
                       add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_cli_offers_every_parser() -> None:
    from kubeinfer.engine.server.cli import TOOL_CALL_PARSERS
    from kubeinfer.engine.server.tools.parsers import TOOL_PARSERS

    assert sorted(TOOL_CALL_PARSERS) == sorted(TOOL_PARSERS)


@pytest.mark.parametrize(("text", "complete", "cut"), [
    ('[{"name": "get_weather", "parameters": {"city": "Par', [], [("get_weather", '{"city": "Par')]),
    ('[{"name": "a", "parameters": {}}, {"name": "b\\"c", "param', [("a", "{}")], [("a", "{}"), ('b"c', "")]),
    ('[{"name": "get_wea', [], []),  # not even the name: nothing to call
    ('[{"name": "a", "parameters": {}}]', [("a", "{}")], [("a", "{}")]),  # a closed list is whole
])
def test_a_forced_list_cut_short_keeps_its_last_call(text: str, complete: list, cut: list) -> None:
    from kubeinfer.engine.server.tools.forced import required_calls

    assert [(c.name, c.arguments) for c in required_calls(text)] == complete
    assert [(c.name, c.arguments) for c in required_calls(text, cut=True)] == cut
