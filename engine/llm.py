"""``LLM``: the offline API, vLLM's shape (``LLM(model=...).generate(prompts, params)``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceOf
from typing import Any

from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import RequestFailedError
from kubeinfer.engine.llm_engine import LLMEngine
from kubeinfer.engine.outputs import RequestOutput
from kubeinfer.engine.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Offline batched generation. Keyword options are the ``EngineConfig`` fields (serve flags)."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **options))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: Prompt | SequenceOf[Prompt],
                 sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        return self._run(prompt_list, self._params_for(sampling_params, len(prompt_list)), [None] * len(prompt_list))

    def chat(self, messages: list[Message] | SequenceOf[list[Message]],
             sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        texts = [tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               chat_template=chat_template) for conv in conversations]
        # The template already holds the special tokens: don't let encode() add a second BOS.
        token_ids = [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
        return self._run(token_ids, self._params_for(sampling_params, len(texts)), texts)

    @staticmethod
    def _params_for(params: SamplingParams | SequenceOf[SamplingParams] | None, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling params for {count} prompts")
        return params

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], texts: list[str | None]) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params, strict=True):
                engine.add_request(rid, prompt, p)
        except Exception:
            engine.abort_request(ids)
            raise
        pending = set(ids)
        finished: dict[str, RequestOutput] = {}
        while pending:
            for out in engine.step():
                if out.finished and out.request_id in pending:
                    pending.discard(out.request_id)
                    finished[out.request_id] = out
        results = [finished[rid] for rid in ids]
        failed = [out for out in results if out.error is not None]
        if failed:
            raise RequestFailedError(f"request {failed[0].request_id} failed: {failed[0].error}")
        for out, text in zip(results, texts, strict=True):
            if text is not None:
                out.prompt = text
        return results
