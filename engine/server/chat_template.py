"""Chat messages -> prompt text through the model's chat template (or ``--chat-template``), tools included.

``tools`` reach the template as the ``tools`` variable (Hugging Face's convention, which Qwen2.5, Llama 3.1,
Mistral and Hermes-style templates read). A template that never reads ``tools`` would drop them silently: a
request whose tool plan can describe them (``tool_choice`` required or named: the grammar forces the reply)
gets them in a system message instead; any other request with tools against it is a 400
(``--chat-template`` can point at a tool-aware template).

Assistant messages with ``tool_calls`` and ``tool`` messages with ``tool_call_id`` are handed to the
template in the shape those templates expect (arguments as a JSON object, as vLLM does).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from kubeinfer.engine.server.errors import bad_request
from kubeinfer.engine.server.protocol import ChatMessage


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file path or the template text itself (vLLM accepts both)."""
    if not value:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.exists():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template: {value} is neither a file nor a Jinja template")
    return value


@lru_cache(maxsize=16)
def template_reads(source: str, variable: str) -> bool:
    """Whether the Jinja template ``source`` reads ``variable`` (e.g. ``tools``)."""
    try:
        parsed = jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError:
        return variable in source
    return variable in jinja2.meta.find_undeclared_variables(parsed)


def template_source(tokenizer: Any, override: str | None, with_tools: bool) -> str | None:
    if override is not None:
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: "tool_use" for tools, as transformers picks
        return template.get("tool_use") if with_tools and "tool_use" in template else template.get("default")
    return template


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for m in messages:
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            turn["name"] = m.name
        if m.tool_calls:
            turn["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in m.tool_calls]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text  # not JSON: the template gets it as it came


def with_system_text(turns: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``text`` appended to the conversation's system message (one is added first when there is none)."""
    if turns and turns[0]["role"] == "system":
        first = dict(turns[0], content=f"{turns[0]['content']}\n\n{text}" if turns[0]["content"] else text)
        return [first, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def render_chat(tokenizer: Any, messages: list[ChatMessage], *, override: str | None,
                tools: list[dict[str, Any]] | None, add_generation_prompt: bool,
                extra: dict[str, Any] | None = None, tool_instructions: str | None = None) -> str:
    """``tool_instructions``: the system text that describes ``tools`` to a template that never reads them."""
    source = template_source(tokenizer, override, bool(tools))
    if source is None:
        raise bad_request("the model has no chat template; start the server with --chat-template", "messages")
    turns = conversation(messages)
    if tools and not template_reads(source, "tools"):
        if tool_instructions is None:
            raise bad_request("this model's chat template does not support tools; start the server with "
                              "--chat-template pointing at a tool-aware template (tool_choice \"required\" or a "
                              "named function works with any template)", "tools")
        turns, tools = with_system_text(turns, tool_instructions), None
    try:
        return tokenizer.apply_chat_template(turns, tools=tools or None, chat_template=source,
                                             tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **(extra or {}))
    except Exception as exc:  # jinja2 errors from the template (e.g. an unsupported role order)
        raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from exc
