"""``tool_choice: required`` and a named function, enforced with structured outputs (as vLLM does).

Named: the model writes the function's arguments, constrained by its ``parameters`` schema; the reply is
that one call. Required: the model writes a JSON list of ``{"name": ..., "parameters": {...}}``, each item
constrained to one of the tools and its schema (at least one item; one at most without
``parallel_tool_calls``). Either way the arguments parse and match the schema, whatever the model. For a
chat template that never reads ``tools``, ``*_instructions`` describe the tools and that reply in a system
message instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kubeinfer.engine.server.protocol import ChatTool
from kubeinfer.engine.server.tools.parsers import ParsedToolCall
from kubeinfer.engine.structured_outputs import StructuredOutputsParams

_DECODER = json.JSONDecoder()
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def parameters_schema(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or _ANY_OBJECT


def named_constraint(tool: ChatTool) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=parameters_schema(tool), strict=tool.function.strict is not False,
                                   source="tools")


def required_constraint(tools: list[ChatTool], parallel: bool) -> StructuredOutputsParams:
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t.function.name]},
                             "parameters": parameters_schema(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema, source="tools")


def _described(tools: list[ChatTool]) -> str:
    return json.dumps([t.function.model_dump(exclude_none=True) for t in tools], ensure_ascii=False, indent=1)


def required_instructions(tools: list[ChatTool]) -> str:
    """The system text for a template without tools: the tools, and the JSON list required_constraint forces."""
    return (f"You can call these tools:\n{_described(tools)}\n\nReply with only a JSON list of the calls to make, "
            'each {"name": <the tool\'s name>, "parameters": <its arguments as a JSON object>}.')


def named_instructions(tool: ChatTool) -> str:
    """The system text for a template without tools: the tool, and the arguments object named_constraint forces."""
    return (f"You can call this tool:\n{_described([tool])}\n\nCall {tool.function.name}: reply with only its "
            "arguments as a JSON object.")


def named_call(tool: ChatTool, text: str) -> ParsedToolCall:
    return ParsedToolCall(tool.function.name, text)


def required_calls(text: str, cut: bool = False) -> list[ParsedToolCall]:
    """The complete items of the (possibly partial) JSON list ``text``; with ``cut`` (the reply was cut short by
    max_tokens) also the item being written then, with its arguments so far, as OpenAI returns a call that
    max_tokens cut (not when even its name is incomplete)."""
    calls, end = _complete_items(text)
    if cut and end is not None and (last := _cut_item(text[end:])) is not None:
        calls.append(last)
    return calls


def _complete_items(text: str) -> tuple[list[ParsedToolCall], int | None]:
    """The list's complete items, and where what follows them starts (None: the list is closed or absent)."""
    calls: list[ParsedToolCall] = []
    i = text.find("[")
    if i < 0:
        return calls, None
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i < len(text) and text[i] == "]":
            return calls, None
        if i >= len(text):
            return calls, i
        try:
            item, end = _DECODER.raw_decode(text, i)
        except ValueError:
            return calls, i
        i = end
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append(ParsedToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))


_CUT_ITEM = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*(?:,\s*"parameters"\s*:\s*(.*))?', re.DOTALL)


def _cut_item(text: str) -> ParsedToolCall | None:
    match = _CUT_ITEM.match(text)
    if match is None:
        return None
    return ParsedToolCall(json.loads(match.group(1)), (match.group(2) or "").rstrip())
