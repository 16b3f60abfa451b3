"""`POST /v1/chat/completions`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from kubeinfer.engine.server.choices import ChoiceStream, ChoiceUpdate, sse_events
from kubeinfer.engine.server.errors import bad_request
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


class ChatServing(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        prompt_ids = await self._render_prompt(request)
        top = request.top_logprobs or 0
        if request.top_logprobs and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        params = build_sampling_params(
            request,
            max_tokens=request.requested_max_tokens(),
            logprobs=top if request.logprobs else None,
            prompt_logprobs=request.prompt_logprobs,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.submit([(request_id, prompt_ids, params)], prompt_param="messages")
        choices = ChoiceStream(streams, request.n, with_logprobs=request.logprobs)

        async def collect() -> ChatCompletionResponse:
            [final] = await choices.collect()
            return self._response(request_id, request, final, choices.usage())

        return await self.respond(
            raw,
            stream=request.stream,
            collect=collect,
            events=lambda: self._events(request_id, request, choices),
        )

    async def _render_prompt(self, request: ChatCompletionRequest) -> list[int]:
        text = await self.prompts.run(self.render_text, request)  # templates of long chats take time too
        return await self.encode(  # the engine validates the ids and the context length
            text, add_special_tokens=False, param="messages", reserved_tokens=request.requested_max_tokens()
        )

    def render_text(self, request: ChatCompletionRequest) -> str:
        """The conversation through the chat template (also what `/tokenize` counts; blocking: run it on
        the prompt pool)."""
        conversation = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=request.add_generation_prompt
            )
        except Exception as exc:  # jinja2 errors from the template (e.g. an unsupported role order)
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from exc
        return text

    def _logprobs(self, request: ChatCompletionRequest, choice: Any, start: int = 0) -> Any:
        if not request.logprobs or choice.logprobs is None:
            return None
        ids = list(choice.token_ids[start:])
        return chat_logprobs(
            ids, choice.logprobs[start : start + len(ids)], request.top_logprobs or 0, self.token_text
        )

    def _response(
        self, request_id: str, request: ChatCompletionRequest, final: Any, usage: UsageInfo
    ) -> ChatCompletionResponse:
        choices = [
            ChatCompletionChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self._logprobs(request, c),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in final.outputs
        ]
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage,
            prompt_logprobs=engine_prompt_logprobs(final) if request.prompt_logprobs is not None else None,
        )

    def _events(
        self, request_id: str, request: ChatCompletionRequest, choices: ChoiceStream
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage)

        def deltas(updates: list[ChoiceUpdate]) -> ChatCompletionChunk:
            return chunk(
                [
                    ChatStreamChoice(
                        index=u.index,
                        delta=DeltaMessage(content=u.text),
                        logprobs=self._logprobs(request, u.output, u.token_start),
                        finish_reason=u.output.finish_reason,
                        stop_reason=u.output.stop_reason,
                    )
                    for u in updates
                ]
            )

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
