"""`POST /v1/completions`: a string, a list of strings, token ids or lists of token ids; `echo`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from kubeinfer.engine.server.errors import bad_request
from kubeinfer.engine.server.logprobs import completion_logprobs
from kubeinfer.engine.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from kubeinfer.engine.server.sampling import build_sampling_params
from kubeinfer.engine.server.serving import OpenAIServing
from kubeinfer.engine.server.streaming import SSE_DONE, merge, sse
from kubeinfer.engine.server.structured import structured_outputs_of


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str  # for echo


class CompletionServing(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of must equal n (beam search is not supported)", "best_of")
        if request.echo and request.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo")
        structured = structured_outputs_of(request)
        prompts = await self._prompts(request)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        params = build_sampling_params(
            request, max_tokens=request.max_tokens, logprobs=request.logprobs, structured_outputs=structured
        )
        jobs = [(f"{base_id}-{i}", prompt.token_ids, params) for i, prompt in enumerate(prompts)]
        streams = await self.submit(jobs)

        async def collect() -> CompletionResponse:
            finals: list[Any] = [None] * len(streams)
            async for index, output in merge(streams):
                finals[index] = output
            return self._response(base_id, request, prompts, finals)

        return await self.respond(
            raw,
            stream=request.stream,
            collect=collect,
            events=lambda: self._events(base_id, request, prompts, streams),
        )

    async def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise bad_request("the prompt is empty", "prompt")
        if all(isinstance(p, int) for p in raw):
            raw = [raw]  # one prompt of token ids
        prompts = []
        for item in raw:
            if isinstance(item, str):
                ids = await self.encode(
                    item, add_special_tokens=True, param="prompt", reserved_tokens=request.max_tokens
                )
                prompts.append(_Prompt(ids, item))
            else:  # the engine checks the ids against the vocabulary
                ids = list(item)
                text = await self.prompts.run(self._echo_text, ids) if request.echo else ""
                prompts.append(_Prompt(ids, text))
        return prompts

    def _echo_text(self, ids: list[int]) -> str:
        vocab = self.engine.vocab_size
        return self.tokenizer.decode([t for t in ids if vocab is None or t < vocab])

    def _choice_logprobs(self, request: CompletionRequest, c: Any, start: int, offset: int) -> Any:
        if request.logprobs is None or c.logprobs is None:
            return None
        ids = list(c.token_ids[start:])
        return completion_logprobs(
            ids, c.logprobs[start : start + len(ids)], request.logprobs, self.token_text, offset
        )

    def _usage(self, prompts: list[_Prompt], finals: list[Any]) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for f in finals if f is not None for c in f.outputs)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    def _response(
        self, request_id: str, request: CompletionRequest, prompts: list[_Prompt], finals: list[Any]
    ) -> CompletionResponse:
        choices = []
        for p, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
            prefix = prompt.text if request.echo else ""
            for c in final.outputs:
                choices.append(
                    CompletionChoice(
                        index=p * request.n + c.index,
                        text=prefix + c.text,
                        logprobs=self._choice_logprobs(request, c, 0, len(prefix)),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=self._usage(prompts, finals)
        )

    async def _events(
        self, request_id: str, request: CompletionRequest, prompts: list[_Prompt], streams: list[Any]
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return sse(CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage))

        n = request.n
        sent_text = [0] * (len(prompts) * n)
        sent_tokens = [0] * (len(prompts) * n)
        finished = [False] * (len(prompts) * n)
        finals: list[Any] = [None] * len(prompts)
        if request.echo:
            yield chunk(
                [
                    CompletionChoice(index=p * n + i, text=prompt.text)
                    for p, prompt in enumerate(prompts)
                    for i in range(n)
                ]
            )
        async for p, output in merge(streams):
            finals[p] = output
            choices = []
            for c in output.outputs:
                k = p * n + c.index
                if finished[k]:
                    continue
                delta_text = c.text[sent_text[k] :]
                offset = (len(prompts[p].text) if request.echo else 0) + sent_text[k]
                logprobs: CompletionLogprobs | None = self._choice_logprobs(
                    request, c, sent_tokens[k], offset
                )
                sent_text[k], sent_tokens[k] = len(c.text), len(c.token_ids)
                finished[k] = c.finish_reason is not None
                if delta_text or finished[k] or (logprobs is not None and logprobs.tokens):
                    choices.append(
                        CompletionChoice(
                            index=k,
                            text=delta_text,
                            logprobs=logprobs,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
            if choices:
                yield chunk(choices)
        if request.wants_usage_in_stream():
            yield chunk([], self._usage(prompts, finals))
        yield SSE_DONE
