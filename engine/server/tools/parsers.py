"""Tool-call parsers for ``tool_choice: auto`` (``--tool-call-parser``, vLLM's names): model text -> calls.

- ``hermes`` (Hermes 2 Pro, Qwen2.5; ``qwen`` is the same format): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>``, one block per call, free text before them.
- ``llama3_json`` (Llama 3.1/3.2 JSON tool calling): the reply is ``{"name": ..., "parameters": {...}}``
  (optionally after ``<|python_tag|>``), several calls separated by ``;``.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list ``[{"name": ..., "arguments": {...}}, ...]``.

``extract`` parses a whole reply; ``complete_calls`` the calls already complete in a partial one (for
streaming). A block that does not parse stays text: nothing the model wrote is dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


def _call(obj: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = {}
    for key in arguments_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models send the arguments as a JSON string already
        try:
            json.loads(args)
            return ParsedToolCall(obj["name"], args)
        except ValueError:
            return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


@dataclass
class Extracted:
    content: str | None
    calls: list[ParsedToolCall]


class ToolParser:
    name = ""
    start_markers: tuple[str, ...] = ()  # text that begins tool calls (content before it streams as text)
    keep_special_tokens = False  # the markers are special tokens the detokenizer must keep

    def extract(self, text: str) -> Extracted:
        raise NotImplementedError

    def complete_calls(self, text: str) -> list[ParsedToolCall]:
        """Calls already complete in a partial reply (default: none until the end)."""
        return []

    def tool_start(self, text: str) -> int | None:
        """Where the tool calls begin in ``text`` (None: not yet seen)."""
        found = [i for i in (text.find(m) for m in self.start_markers) if i >= 0]
        return min(found) if found else None


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _blocks(self, text: str, closed_only: bool) -> list[tuple[ParsedToolCall | None, str]]:
        out = []
        for match in self._BLOCK.finditer(text):
            if closed_only and not match.group(0).rstrip().endswith("</tool_call>"):
                continue
            try:
                call = _call(json.loads(match.group(1)))
            except ValueError:
                call = None
            out.append((call, match.group(0)))
        return out

    def extract(self, text: str) -> Extracted:
        start = self.tool_start(text)
        if start is None:
            return Extracted(text, [])
        blocks = self._blocks(text[start:], closed_only=False)
        calls = [c for c, _ in blocks if c is not None]
        if not calls or len(calls) != len(blocks):
            return Extracted(text, [])  # something did not parse: the reply stays text
        content = text[:start].strip()
        return Extracted(content or None, calls)

    def complete_calls(self, text: str) -> list[ParsedToolCall]:
        start = self.tool_start(text)
        if start is None:
            return []
        calls = []
        for call, _ in self._blocks(text[start:], closed_only=True):
            if call is None:
                break
            calls.append(call)
        return calls


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = ("<|python_tag|>",)
    keep_special_tokens = True

    def tool_start(self, text: str) -> int | None:
        marker = super().tool_start(text)
        if marker is not None:
            return marker
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else None

    def _objects(self, text: str) -> tuple[list[Any], bool]:
        """JSON values separated by ';' (and whitespace) from the start of ``text``; whether all of it parsed."""
        values, i = [], 0
        while True:
            while i < len(text) and text[i] in " \t\r\n;":
                i += 1
            if i >= len(text):
                return values, True
            try:
                value, i = _DECODER.raw_decode(text, i)
            except ValueError:
                return values, False
            values.append(value)

    def _body(self, text: str) -> tuple[str, str] | None:
        start = self.tool_start(text)
        if start is None:
            return None
        body = text[start:]
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        return text[:start], body

    def extract(self, text: str) -> Extracted:
        parts = self._body(text)
        if parts is None:
            return Extracted(text, [])
        before, body = parts
        values, complete = self._objects(body)
        calls = [_call(v) for v in values]
        if not complete or not calls or any(c is None for c in calls):
            return Extracted(text, [])
        return Extracted(before.strip() or None, [c for c in calls if c is not None])

    def complete_calls(self, text: str) -> list[ParsedToolCall]:
        parts = self._body(text)
        if parts is None:
            return []
        values, _ = self._objects(parts[1])
        calls = [_call(v) for v in values]
        return [c for c in calls if c is not None] if all(c is not None for c in calls) else []


class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = ("[TOOL_CALLS]",)
    keep_special_tokens = True

    def _calls(self, body: str) -> list[ParsedToolCall] | None:
        body = body.strip()
        try:
            value, end = _DECODER.raw_decode(body)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        calls = [_call(v) for v in items]
        if not calls or any(c is None for c in calls) or body[end:].strip():
            return None
        return [c for c in calls if c is not None]

    def extract(self, text: str) -> Extracted:
        start = self.tool_start(text)
        if start is None:
            return Extracted(text, [])
        calls = self._calls(text[start + len("[TOOL_CALLS]"):])
        if calls is None:
            return Extracted(text, [])
        return Extracted(text[:start].strip() or None, calls)

    def complete_calls(self, text: str) -> list[ParsedToolCall]:
        start = self.tool_start(text)
        return (self._calls(text[start + len("[TOOL_CALLS]"):]) or []) if start is not None else []


class QwenToolParser(HermesToolParser):
    """Qwen2.5's format is Hermes' (``<tool_call>`` blocks); the name exists because vLLM users pass it."""

    name = "qwen"


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, QwenToolParser, Llama3JsonToolParser, MistralToolParser)}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {', '.join(TOOL_PARSERS)}") from None
