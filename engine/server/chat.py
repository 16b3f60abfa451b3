"""`POST /v1/chat/completions`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from kubeinfer.engine.server.chat_template import render_chat
from kubeinfer.engine.server.choices import ChoiceStream, ChoiceUpdate, sse_events
from kubeinfer.engine.server.logprobs import chat_logprobs, engine_prompt_logprobs
from kubeinfer.engine.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from kubeinfer.engine.server.sampling import build_sampling_params
from kubeinfer.engine.server.serving import OpenAIServing
from kubeinfer.engine.server.structured import structured_outputs_of
from kubeinfer.engine.server.tools.output import ChoiceTools
from kubeinfer.engine.server.tools.plan import ToolPlan, described_tools, plan_tools, tool_definitions


class ChatServing(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        plan = plan_tools(
            request,
            enable_auto_tool_choice=self.settings.enable_auto_tool_choice,
            tool_call_parser=self.settings.tool_call_parser,
        )
        structured = plan.constraint or structured_outputs_of(request)
        prompt_ids = await self._render_prompt(request, plan)
        top = request.top_logprobs or 0
        params = build_sampling_params(
            request,
            max_tokens=request.requested_max_tokens(),
            logprobs=top if request.logprobs else None,
            prompt_logprobs=request.prompt_logprobs,
            structured_outputs=structured,
            skip_special_tokens=False if plan.keep_special_tokens else None,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.submit([(request_id, prompt_ids, params)], prompt_param="messages")
        choices = ChoiceStream(streams, request.n, with_logprobs=request.logprobs)

        async def collect() -> ChatCompletionResponse:
            [final] = await choices.collect()
            return self._response(request_id, request, final, plan, choices.usage())

        return await self.respond(
            raw,
            stream=request.stream,
            collect=collect,
            events=lambda: self._events(request_id, request, choices, plan),
        )

    async def _render_prompt(self, request: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
        text = await self.prompts.run(
            self.render_text, request, plan
        )  # templates of long chats take time too
        return await self.encode(  # the engine validates the ids and the context length
            text, add_special_tokens=False, param="messages", reserved_tokens=request.requested_max_tokens()
        )

    def render_text(self, request: ChatCompletionRequest, plan: ToolPlan | None = None) -> str:
        """The conversation through the chat template, tools included (also what `/tokenize` counts;
        blocking: run it on the prompt pool)."""
        tools = plan.template_tools if plan is not None else tool_definitions(request)
        return render_chat(
            self.tokenizer,
            request.messages,
            override=self.settings.chat_template,
            tools=tools,
            add_generation_prompt=request.add_generation_prompt,
            extra=request.chat_template_kwargs,
            tool_instructions=plan.instructions if plan is not None else described_tools(request),
        )

    def _logprobs(self, request: ChatCompletionRequest, choice: Any, start: int = 0) -> Any:
        if not request.logprobs or choice.logprobs is None:
            return None
        ids = list(choice.token_ids[start:])
        return chat_logprobs(
            ids, choice.logprobs[start : start + len(ids)], request.top_logprobs or 0, self.token_text
        )

    def _response(
        self, request_id: str, request: ChatCompletionRequest, final: Any, plan: ToolPlan, usage: UsageInfo
    ) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            tools = ChoiceTools(plan)
            content, tool_calls = tools.final(c.text, cut=c.finish_reason == "length")
            choices.append(
                ChatCompletionChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=content, tool_calls=tool_calls),
                    logprobs=self._logprobs(request, c),
                    finish_reason=tools.finish_reason(c.finish_reason, bool(tool_calls)),
                    stop_reason=c.stop_reason,
                )
            )
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage,
            prompt_logprobs=engine_prompt_logprobs(final) if request.prompt_logprobs is not None else None,
        )

    def _events(
        self, request_id: str, request: ChatCompletionRequest, choices: ChoiceStream, plan: ToolPlan
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage)

        tools = [ChoiceTools(plan) for _ in range(request.n)]

        def deltas(updates: list[ChoiceUpdate]) -> ChatCompletionChunk | None:
            out = []
            for u in updates:
                c, choice_tools = u.output, tools[u.index]
                delta_text, call_deltas = choice_tools.delta(c.text, u.finished,
                                                             cut=u.finished and c.finish_reason == "length")
                logprobs = self._logprobs(request, c, u.token_start)
                if not delta_text and not call_deltas and not u.finished and logprobs is None:
                    continue  # text the tool-call parser holds back
                out.append(
                    ChatStreamChoice(
                        index=u.index,
                        delta=DeltaMessage(
                            content=delta_text or ("" if not call_deltas else None),
                            tool_calls=call_deltas or None,
                        ),
                        logprobs=logprobs,
                        finish_reason=choice_tools.finish_reason(c.finish_reason, choice_tools.has_calls),
                        stop_reason=c.stop_reason,
                    )
                )
            return chunk(out) if out else None

        role = chunk(
            [
                ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(request.n)
            ]
        )
        return sse_events(
            choices,
            deltas,
            usage_chunk=(lambda usage: chunk([], usage)) if request.wants_usage_in_stream() else None,
            preamble=[role],
        )
