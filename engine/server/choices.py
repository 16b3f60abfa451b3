"""What chat and completions share when answering: each choice's progress across engine outputs
(the deltas a stream sends), the final outputs of a non-streaming answer, and usage.

A request has one engine stream per prompt (completions may batch several) and ``n`` choices per
prompt; OpenAI's choice index is ``prompt * n + output.index``. The endpoint turns each batch of
``ChoiceUpdate`` into its own chunk type; everything else (merging the streams, what is new since
the last event, the usage chunk and ``[DONE]``) lives here once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubeinfer.engine.outputs import CompletionOutput, RequestOutput
from kubeinfer.engine.server.protocol import UsageInfo
from kubeinfer.engine.server.streaming import SSE_DONE, merge, sse
from pydantic import BaseModel


@dataclass
class ChoiceUpdate:
    """What one choice gained since the previous event."""

    index: int  # OpenAI's choice index
    prompt_index: int
    output: CompletionOutput  # cumulative, as the engine reports it
    request_output: RequestOutput
    text: str  # the new text
    token_start: int  # output.token_ids[token_start:] are new
    first: bool  # the first update of this choice

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None


def usage_of(prompt_tokens: int, finals: Iterable[RequestOutput | None]) -> UsageInfo:
    completion_tokens = sum(len(c.token_ids) for f in finals if f is not None for c in f.outputs)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class ChoiceStream:
    """The engine streams of one HTTP request, read as choice updates (or collected to the end)."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]], n: int, *, with_logprobs: bool) -> None:
        self.streams = streams
        self.n = n
        self.with_logprobs = with_logprobs  # a choice with new tokens but no new text still gets an event
        self.finals: list[RequestOutput | None] = [None] * len(streams)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(f.prompt_token_ids) for f in self.finals if f is not None)

    def usage(self) -> UsageInfo:
        return usage_of(self.prompt_tokens, self.finals)

    async def aclose(self) -> None:
        for stream in self.streams:
            await stream.aclose()  # type: ignore[attr-defined]

    async def collect(self) -> list[RequestOutput]:
        """Every stream to its end; the final output of each prompt, in prompt order."""
        try:
            async for _ in self.updates():
                pass
        finally:
            await self.aclose()
        assert all(f is not None for f in self.finals)
        return list(self.finals)  # type: ignore[arg-type]

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        started: set[int] = set()  # choices with an update already
        finished: set[int] = set()
        async for p, output in merge(self.streams):
            self.finals[p] = output
            batch = []
            for c in output.outputs:
                k = p * self.n + c.index
                if k in finished:
                    continue
                start = sent_tokens.get(k, 0)
                text = c.text[sent_text.get(k, 0) :]
                sent_text[k], sent_tokens[k] = len(c.text), len(c.token_ids)
                if c.finish_reason is not None:
                    finished.add(k)
                new_tokens = len(c.token_ids) > start
                if text or c.finish_reason is not None or (self.with_logprobs and new_tokens):
                    batch.append(ChoiceUpdate(k, p, c, output, text, start, k not in started))
                    started.add(k)
            if batch:
                yield batch


async def sse_events(
    choices: ChoiceStream,
    chunk: Callable[[list[ChoiceUpdate]], BaseModel | None],
    *,
    usage_chunk: Callable[[UsageInfo], BaseModel] | None = None,
    preamble: Iterable[BaseModel] = (),
) -> AsyncIterator[str]:
    """The SSE body of a streamed answer: ``preamble``, one chunk per batch of updates (``chunk`` may
    return None to send nothing), the usage chunk when asked for, then ``[DONE]``."""
    try:
        for event in preamble:
            yield sse(event)
        async for batch in choices.updates():
            event: Any = chunk(batch)
            if event is not None:
                yield sse(event)
    finally:
        await choices.aclose()
    if usage_chunk is not None:
        yield sse(usage_chunk(choices.usage()))
    yield SSE_DONE
