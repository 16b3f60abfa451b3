"""`POST /v1/completions`: a string, a list of strings, token ids or lists of token ids; `echo`.

`echo` with `logprobs` returns the prompt's token logprobs first (the first token's is null), then
the completion's; `max_tokens: 0` with `echo` scores the prompt only (the engine still samples one
token, which the answer leaves out), as lm-evaluation-harness's loglikelihood requests expect.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from kubeinfer.engine.outputs import RequestOutput
from kubeinfer.engine.server.choices import ChoiceStream, ChoiceUpdate, sse_events
from kubeinfer.engine.server.errors import bad_request, unsupported
from kubeinfer.engine.server.logprobs import (
    completion_logprobs,
    concat_logprobs,
    engine_prompt_logprobs,
    prompt_completion_logprobs,
)
from kubeinfer.engine.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from kubeinfer.engine.server.sampling import build_sampling_params
from kubeinfer.engine.server.serving import OpenAIServing
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
            raise unsupported("best_of must equal n (beam search is not supported)", "best_of")
        score_only = request.max_tokens == 0
        if score_only and not request.echo:
            raise bad_request("max_tokens must be at least 1 (0 is only allowed with echo)", "max_tokens")
        structured = structured_outputs_of(request)
        prompts = await self._prompts(request)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        params = build_sampling_params(
            request,
            max_tokens=1 if score_only else request.max_tokens,
            logprobs=request.logprobs,
            prompt_logprobs=self._prompt_logprobs_k(request),
            structured_outputs=structured,
        )
        jobs = [(f"{base_id}-{i}", prompt.token_ids, params) for i, prompt in enumerate(prompts)]
        streams: list[Any] = await self.submit(jobs)
        if score_only:
            streams = [_prompt_only(s) for s in streams]
        choices = ChoiceStream(streams, request.n, with_logprobs=request.logprobs is not None)

        async def collect() -> CompletionResponse:
            finals = await choices.collect()
            return self._response(base_id, request, prompts, finals, choices.usage())

        return await self.respond(
            raw,
            stream=request.stream,
            collect=collect,
            events=lambda: self._events(base_id, request, prompts, choices),
        )

    @staticmethod
    def _prompt_logprobs_k(request: CompletionRequest) -> int | None:
        """Prompt logprobs the engine computes: vLLM's field, and what echo with logprobs shows."""
        wanted = [
            k for k in (request.prompt_logprobs, request.logprobs if request.echo else None) if k is not None
        ]
        return max(wanted) if wanted else None

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

    def _choice_logprobs(
        self, request: CompletionRequest, update: ChoiceUpdate, prompt: _Prompt, echoed: bool
    ) -> CompletionLogprobs | None:
        """The new tokens' logprobs, after the prompt's when this update carries the echo."""
        c = update.output
        if request.logprobs is None or c.logprobs is None:
            return None
        offset = (len(prompt.text) if request.echo else 0) + len(c.text) - len(update.text)
        ids = list(c.token_ids[update.token_start :])
        generated = completion_logprobs(
            ids, c.logprobs[update.token_start :][: len(ids)], request.logprobs, self.token_text, offset
        )
        if not echoed:
            return generated
        entries = update.request_output.prompt_logprobs
        assert entries is not None  # echo with logprobs asked the engine for them
        head = prompt_completion_logprobs(prompt.token_ids, entries, request.logprobs, self.token_text)
        return concat_logprobs(head, generated)

    def _choice(
        self, request: CompletionRequest, prompts: list[_Prompt], update: ChoiceUpdate
    ) -> CompletionChoice:
        prompt = prompts[update.prompt_index]
        echoed = request.echo and update.first
        c = update.output
        want_prompt_logprobs = request.prompt_logprobs is not None and update.first
        return CompletionChoice(
            index=update.index,
            text=(prompt.text if echoed else "") + update.text,
            logprobs=self._choice_logprobs(request, update, prompt, echoed),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            prompt_logprobs=engine_prompt_logprobs(update.request_output) if want_prompt_logprobs else None,
        )

    def _response(
        self,
        request_id: str,
        request: CompletionRequest,
        prompts: list[_Prompt],
        finals: list[RequestOutput],
        usage: UsageInfo,
    ) -> CompletionResponse:
        choices = [
            self._choice(
                request, prompts, ChoiceUpdate(p * request.n + c.index, p, c, final, c.text, 0, first=True)
            )
            for p, final in enumerate(finals)
            for c in final.outputs
        ]
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    def _events(
        self, request_id: str, request: CompletionRequest, prompts: list[_Prompt], choices: ChoiceStream
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

        return sse_events(
            choices,
            lambda updates: chunk([self._choice(request, prompts, u) for u in updates]),
            usage_chunk=(lambda usage: chunk([], usage)) if request.wants_usage_in_stream() else None,
        )


async def _prompt_only(stream: Any) -> AsyncIterator[RequestOutput]:
    """A score-only request's outputs without the one token the engine sampled (`max_tokens: 0`)."""
    try:
        async for output in stream:
            if output.finished:
                yield dataclasses.replace(
                    output,
                    outputs=[
                        dataclasses.replace(
                            c,
                            text="",
                            token_ids=[],
                            logprobs=[] if c.logprobs is not None else None,
                            cumulative_logprob=None,
                            finish_reason="abort" if c.finish_reason == "abort" else "length",
                            stop_reason=None,
                        )
                        for c in output.outputs
                    ],
                )
    finally:
        await stream.aclose()
