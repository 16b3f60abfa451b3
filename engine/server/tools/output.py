"""One choice's reply -> ``content`` and ``tool_calls``, whole (``final``) or as stream deltas (``delta``).

Streaming follows OpenAI's shape: each call appears once with its ``index``, ``id``, ``type`` and
``function.name`` (and its arguments, or the first of them), later deltas of the same index add to
``function.arguments``. With ``auto``, text before the first tool-call marker streams as content; a tail
that could still become a marker is held back until it cannot. A reply with tool calls finishes with
``finish_reason: "tool_calls"``; one that max_tokens cut keeps ``length`` and, as OpenAI's, the call it was
writing, with its arguments so far (a named function's always; ``required``'s last one once its name is whole).
"""

from __future__ import annotations

import random
import string
import uuid

from kubeinfer.engine.server.protocol import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from kubeinfer.engine.server.tools.forced import named_call, required_calls
from kubeinfer.engine.server.tools.parsers import MistralToolParser, ParsedToolCall
from kubeinfer.engine.server.tools.plan import ToolPlan


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the start of a marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class ChoiceTools:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.ids: list[str] = []
        self.sent_content = 0  # characters of the reply sent as content
        self.sent_calls = 0
        self.sent_arguments = 0  # named: characters of the arguments sent

    def _id(self, index: int) -> str:
        while len(self.ids) <= index:
            if isinstance(self.plan.parser, MistralToolParser):  # Mistral's templates want 9 alphanumerics
                self.ids.append("".join(random.choices(string.ascii_letters + string.digits, k=9)))
            else:
                self.ids.append(f"chatcmpl-tool-{uuid.uuid4().hex}")
        return self.ids[index]

    def _tool_calls(self, calls: list[ParsedToolCall]) -> list[ToolCall]:
        return [ToolCall(id=self._id(i), function=FunctionCall(name=c.name, arguments=c.arguments))
                for i, c in enumerate(calls)]

    @staticmethod
    def finish_reason(reason: str | None, has_calls: bool) -> str | None:
        return "tool_calls" if has_calls and reason == "stop" else reason

    # ---- whole reply ----------------------------------------------------------------------
    def final(self, text: str, cut: bool = False) -> tuple[str | None, list[ToolCall]]:
        """``cut``: max_tokens ended the reply (a forced list then keeps its last, unfinished call)."""
        plan = self.plan
        if plan.mode == "named":
            assert plan.named is not None
            return None, self._tool_calls([named_call(plan.named, text)])
        if plan.mode == "required":
            return None, self._tool_calls(required_calls(text, cut))
        if plan.mode == "auto":
            assert plan.parser is not None
            extracted = plan.parser.extract(text)
            return extracted.content, self._tool_calls(extracted.calls)
        return text, []

    # ---- streaming ------------------------------------------------------------------------
    def delta(self, text: str, finished: bool, cut: bool = False) -> tuple[str | None, list[ToolCallDelta]]:
        """What to send now, given the reply so far: (content delta, tool-call deltas); ``cut``: max_tokens
        ended it here."""
        plan = self.plan
        if plan.mode == "none":
            return self._content_upto(text, len(text)), []
        if plan.mode == "named":
            return None, self._named_delta(text)
        if plan.mode == "required":
            return None, self._new_calls(required_calls(text, cut))
        return self._auto_delta(text, finished)

    def _content_upto(self, text: str, end: int) -> str | None:
        if end <= self.sent_content:
            return None
        piece, self.sent_content = text[self.sent_content:end], end
        return piece

    def _named_delta(self, text: str) -> list[ToolCallDelta]:
        assert self.plan.named is not None
        deltas = []
        if self.sent_calls == 0:
            self.sent_calls = 1
            deltas.append(ToolCallDelta(index=0, id=self._id(0), type="function",
                                        function=FunctionCallDelta(name=self.plan.named.function.name,
                                                                   arguments="")))
        if len(text) > self.sent_arguments:
            deltas.append(ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text[self.sent_arguments:])))
            self.sent_arguments = len(text)
        return deltas

    def _new_calls(self, calls: list[ParsedToolCall]) -> list[ToolCallDelta]:
        deltas = []
        for i in range(self.sent_calls, len(calls)):
            deltas.append(ToolCallDelta(index=i, id=self._id(i), type="function",
                                        function=FunctionCallDelta(name=calls[i].name, arguments=calls[i].arguments)))
        self.sent_calls = max(self.sent_calls, len(calls))
        return deltas

    def _auto_delta(self, text: str, finished: bool) -> tuple[str | None, list[ToolCallDelta]]:
        parser = self.plan.parser
        assert parser is not None
        start = parser.tool_start(text)
        if start is None:
            end = len(text) if finished else len(text) - _held_back(text, parser.start_markers)
            if not finished and not text.strip():
                end = self.sent_content  # leading whitespace may still turn out to precede a call
            return self._content_upto(text, end), []
        before = text[:start].rstrip() if self.sent_content <= len(text[:start].rstrip()) else text[:start]
        content = self._content_upto(text, len(before))
        if not finished:
            return content, self._new_calls(parser.complete_calls(text))
        extracted = parser.extract(text)
        if not extracted.calls and self.sent_calls == 0:  # did not parse: the rest is text after all
            rest = self._content_upto(text, len(text))
            return (content or "") + (rest or "") or None, []
        return content, self._new_calls(extracted.calls)

    @property
    def has_calls(self) -> bool:
        return self.sent_calls > 0
