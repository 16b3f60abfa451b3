"""What a chat request's ``tools`` / ``tool_choice`` mean for this request: template input, constraint, parser.

- no tools, or ``tool_choice: none``: plain text (tools, when given, still reach the template, as in vLLM);
- ``auto`` (OpenAI's default with tools): needs ``--enable-auto-tool-choice`` and ``--tool-call-parser``; the
  parser finds calls in the reply;
- ``required`` / a named function: structured outputs force the calls (``forced.py``). A chat template that
  never reads ``tools`` (e.g. the bundled SmolLM2's) then gets them described in a system message, with the
  reply the grammar forces (llama.cpp's "generic" tool format), so these work with any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubeinfer.engine.server.errors import unsupported
from kubeinfer.engine.server.protocol import ChatCompletionRequest, ChatTool, NamedToolChoice
from kubeinfer.engine.server.tools.forced import (
    named_constraint,
    named_instructions,
    required_constraint,
    required_instructions,
)
from kubeinfer.engine.server.tools.parsers import ToolParser, get_tool_parser
from kubeinfer.engine.structured_outputs import StructuredOutputsParams

Mode = Literal["none", "auto", "required", "named"]


@dataclass
class ToolPlan:
    mode: Mode
    template_tools: list[dict[str, Any]] | None = None
    constraint: StructuredOutputsParams | None = None
    parser: ToolParser | None = None
    named: ChatTool | None = None
    # for a chat template that never reads tools: a system message describing them and the forced reply
    instructions: str | None = None

    @property
    def keep_special_tokens(self) -> bool:
        return self.parser is not None and self.parser.keep_special_tokens


def tool_definitions(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The request's tools as the chat template gets them."""
    return [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None


def described_tools(request: ChatCompletionRequest) -> str | None:
    """The system text that describes the request's tools to a chat template that never reads them: for
    ``tool_choice`` required or a named function (whose reply the grammar forces), else None."""
    tools, choice = request.tools or [], request.tool_choice
    if tools and choice == "required":
        return required_instructions(tools)
    named = _named_tool(tools, choice) if isinstance(choice, NamedToolChoice) else None
    return None if named is None else named_instructions(named)


def _named_tool(tools: list[ChatTool], choice: NamedToolChoice) -> ChatTool | None:
    return next((t for t in tools if t.function.name == choice.function.name), None)


def plan_tools(request: ChatCompletionRequest, *, enable_auto_tool_choice: bool,
               tool_call_parser: str | None) -> ToolPlan:
    tools, choice = request.tools or [], request.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise unsupported("tool_choice needs tools", "tool_choice")
        return ToolPlan("none")
    template_tools = tool_definitions(request)
    if choice is None:
        choice = "auto"
    constrained = choice == "required" or isinstance(choice, NamedToolChoice)
    if constrained and (request.structured_outputs is not None
                        or (request.response_format is not None and request.response_format.type != "text")):
        raise unsupported("tool_choice required or a named function cannot be combined with response_format "
                          "or structured_outputs", "tool_choice")
    if choice == "none":
        return ToolPlan("none", template_tools)
    if choice == "auto":
        if not enable_auto_tool_choice or not tool_call_parser:
            raise unsupported('"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                              "--tool-call-parser", "tool_choice")
        return ToolPlan("auto", template_tools, parser=get_tool_parser(tool_call_parser))
    if choice == "required":
        return ToolPlan("required", template_tools, constraint=required_constraint(tools, request.parallel_tool_calls),
                        instructions=required_instructions(tools))
    assert isinstance(choice, NamedToolChoice)
    named = _named_tool(tools, choice)
    if named is None:
        raise unsupported(f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                          "tool_choice")
    return ToolPlan("named", template_tools, constraint=named_constraint(named), named=named,
                    instructions=named_instructions(named))
