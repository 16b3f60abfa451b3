"""AsyncLLMEngine in-process over the real LLMEngine (bundled model, small KV cache)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import pytest
from kubeinfer.engine.async_engine import AsyncLLMEngine, EngineDrainingError, RequestAbortedError
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.server.logs import JsonFormatter

pytestmark = pytest.mark.timeout(300)


def _engine() -> AsyncLLMEngine:
    return AsyncLLMEngine(EngineConfig(kv_cache_memory="64MiB", max_model_len=512, max_num_seqs=2))


async def _until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_async_engine_end_to_end(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kubeinfer.requests"):
        asyncio.run(_scenario())
    # One structured line per request, with its numbers and never the prompt.
    records = {r.request["request_id"]: r for r in caplog.records if r.name == "kubeinfer.requests"}
    line = json.loads(JsonFormatter().format(records["r1"]))
    assert line["request"] == {
        **line["request"],
        "prompt_tokens": 1,
        "completion_tokens": 5,
        "finish_reason": "length",
    }
    assert line["request"]["ttft_s"] >= 0 and line["request"]["latency_s"] >= line["request"]["ttft_s"]
    assert "Tell me a story" not in "".join(JsonFormatter().format(r) for r in records.values())
    assert records["load-0"].request["finish_reason"] == "abort"


async def _scenario() -> None:
    engine = _engine()
    engine.start()
    assert engine.state == "loading" and engine.snapshot() is None
    await engine.wait_until_loaded()
    assert engine.is_ready and engine.served_model_name == "SmolLM2-135M-Instruct"

    # generate(): cumulative outputs, the last one finished.
    outputs = [o async for o in engine.generate("Hello", SamplingParams(max_tokens=5, ignore_eos=True), "r1")]
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 5
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths)

    # The engine's refusal surfaces to the caller as its typed error (a ValueError).
    with pytest.raises(ValueError, match="maximum context length is 512"):
        async for _ in engine.generate(list(range(600)), SamplingParams(max_tokens=1), "too-long"):
            pass

    # Waiting + running is exact at any instant (requests in the inbox count as waiting).
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    streams = [engine.add_request(f"load-{i}", "Tell me a story", params) for i in range(4)]
    for _ in range(50):
        snap = engine.snapshot()
        assert snap is not None and snap.num_waiting + snap.num_running == 4
        assert snap.num_running <= 2
        await asyncio.sleep(0.01)

    # Closing a stream aborts its request at once and frees its blocks.
    for stream in streams:
        await stream.aclose()
    await _until(lambda: (s := engine.snapshot()) is not None and (s.num_waiting, s.num_running) == (0, 0))
    assert engine.snapshot().kv_cache_usage == 0.0  # type: ignore[union-attr]
    assert engine.num_in_flight() == 0

    # Drain: new work is refused; what is still running after the grace period is aborted.
    stream = engine.add_request("last", "Tell me a story", params)
    await stream.wait_accepted()
    assert not await engine.drain(timeout=0.2)
    with pytest.raises(EngineDrainingError):
        engine.add_request("late", "x", params)
    with pytest.raises(RequestAbortedError):
        async for _ in stream:
            pass
    await _until(lambda: engine.snapshot().num_running == 0)  # type: ignore[union-attr]
    with contextlib.suppress(Exception):
        engine.shutdown()
    assert engine.state == "stopped"
