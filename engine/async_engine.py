"""`AsyncLLMEngine`: the `LLMEngine` step loop on a background thread, an asyncio stream per request.

`LLMEngine` is not thread-safe, so exactly one thread (the engine thread) touches it: it loads
the model, then loops "apply the inbox (adds and aborts), step, hand outputs to the event loop".
Callers on the event loop only append to the inbox under a lock. The engine thread sleeps on
an event while there is nothing to do.

A request's stream keeps only the newest `RequestOutput`: outputs are cumulative, so a slow
reader skips intermediate ones and loses nothing. Closing or cancelling the async iterator
aborts the request at once, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kubeinfer.engine.errors import RequestFailedError
from kubeinfer.engine.metrics import EngineSnapshot, ServingMetrics

if TYPE_CHECKING:
    from kubeinfer.engine.config import EngineConfig
    from kubeinfer.engine.llm_engine import LLMEngine
    from kubeinfer.engine.outputs import RequestOutput
    from kubeinfer.engine.sampling_params import SamplingParams

logger = logging.getLogger("kubeinfer.engine.async")
request_logger = logging.getLogger("kubeinfer.requests")

LOADING, READY, DRAINING, STOPPED, FAILED = "loading", "ready", "draining", "stopped", "failed"


class EngineNotReadyError(RuntimeError):
    """The model is still loading, failed to load, or the engine has stopped."""


class EngineDrainingError(RuntimeError):
    """The server is shutting down and accepts no new requests."""


class QueueFullError(RuntimeError):
    """The waiting queue already holds `max_waiting_requests` requests."""


class RequestAbortedError(RuntimeError):
    """The engine aborted the request (shutdown grace period over, or an engine failure)."""


class RequestTimeoutError(RuntimeError):
    """The request did not finish within its timeout (`--request-timeout`); it was aborted."""


class _RequestStream:
    """One request's mailbox on the event loop: the newest output (or an error) and a wake-up event."""

    __slots__ = ("_event", "_item", "accepted")

    def __init__(self) -> None:
        self._item: RequestOutput | BaseException | None = None
        self._event = asyncio.Event()
        self.accepted = asyncio.Event()  # set once the engine took the request (or refused it)

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(self._item, BaseException):
            return  # an error is final
        self._item = item
        self._event.set()
        self.accepted.set()

    def pending_error(self) -> BaseException | None:
        return self._item if isinstance(self._item, BaseException) else None

    async def get(self) -> RequestOutput | BaseException:
        await self._event.wait()
        self._event.clear()
        item, self._item = self._item, None
        assert item is not None
        return item


class RequestOutputStream:
    """The async iterator of one request's outputs. Closing it early (`aclose()`, cancellation while
    waiting, or garbage collection) aborts the request in the engine at once."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, stream: _RequestStream) -> None:
        self.request_id = request_id
        self._engine = engine
        self._stream = stream
        self._finished = False
        self._closed = False

    def __aiter__(self) -> RequestOutputStream:
        return self

    async def wait_accepted(self) -> None:
        """Wait until the engine thread has added the request; raise its ValueError if it refused it."""
        try:
            await self._stream.accepted.wait()
        except BaseException:
            self._close()
            raise
        error = self._stream.pending_error()
        if error is not None:
            self._finished = True
            self._close()
            raise error

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self._stream.get()
        except BaseException:  # cancelled: the client went away
            self._close()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            self._close()
            raise item
        if item.finished:
            self._finished = True
            self._close()
        return item

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._release(self.request_id, abort=not self._finished)

    def __del__(self) -> None:
        if not self._closed and self._engine._loop is not None:
            self._closed = True
            self._engine._call_in_loop(functools.partial(self._engine._release, self.request_id, abort=True))


@dataclass
class _Tracker:
    """Per-request timing, kept by the engine thread for metrics and the request log line."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0  # tokens of choice 0 seen so far


def _default_engine_factory(config: EngineConfig) -> LLMEngine:
    from kubeinfer.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    engine.grammar_compiler.start_background_init()  # a server's first structured request need not wait for it
    return engine


class AsyncLLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        max_waiting_requests: int | None = None,
        log_requests: bool = True,
        engine_factory: Callable[[EngineConfig], LLMEngine] | None = None,
        served_model_name: str | None = None,
    ) -> None:
        self.config = config
        self.max_waiting_requests = max_waiting_requests
        self.log_requests = log_requests
        self._engine_factory = engine_factory or _default_engine_factory
        self.metrics = ServingMetrics(self.snapshot, lambda: self.served_model_name)

        # Filled by the engine thread once the model is loaded.
        self.served_model_name: str | None = served_model_name
        self.max_model_len: int | None = None
        self.tokenizer: Any = None  # the event loop's own copy (the engine thread keeps the original)
        self.eos_token_ids: list[int] = []
        self.vocab_size: int | None = None
        self.load_error: BaseException | None = None

        self._state = LOADING
        self._lock = threading.Lock()  # guards inbox, counters, snapshot, state
        self._inbox: deque[tuple[str, Any]] = deque()
        self._queued_adds = 0  # adds in the inbox
        self._adds_in_flight = 0  # adds taken from the inbox, not yet in a published snapshot
        self._engine_snapshot: EngineSnapshot | None = None
        self._wakeup = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded: asyncio.Future[None] | None = None
        self._fatal: asyncio.Future[str] | None = None  # set when the engine can never serve again
        self._streams: dict[str, _RequestStream] = {}  # event-loop thread only
        self._timers: dict[str, asyncio.TimerHandle] = {}  # event-loop thread only: request deadlines
        self._idle: asyncio.Event | None = None
        self._trackers: dict[str, _Tracker] = {}  # engine thread only

    # ------------------------------------------------------------------ lifecycle (event loop)

    def start(self) -> None:
        """Start the engine thread (it loads the model). Call from the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loaded = self._loop.create_future()
        self._fatal = self._loop.create_future()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="kubeinfer-engine", daemon=True)
        self._thread.start()

    @property
    def state(self) -> str:
        return self._state

    @property
    def is_ready(self) -> bool:
        return self._state == READY

    async def wait_until_loaded(self) -> None:
        """Return once the model is loaded; raise the load error if loading failed."""
        assert self._loaded is not None, "start() first"
        await asyncio.shield(self._loaded)

    async def wait_fatal(self) -> str:
        """Return (with the reason) once the engine failed for good, e.g. a tensor-parallel worker died."""
        assert self._fatal is not None, "start() first"
        return await asyncio.shield(self._fatal)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting requests and wait for in-flight ones; abort what is left after `timeout`.

        Returns True when every request finished on its own."""
        with self._lock:
            if self._state in (LOADING, READY):
                self._state = DRAINING
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            remaining = list(self._streams)
            logger.warning("drain timeout: aborting %d request(s)", len(remaining))
            for request_id in remaining:
                self.abort(request_id)
                self._streams[request_id].put(RequestAbortedError("the server is shutting down"))
            return False

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread (after its current step). Safe to call twice."""
        with self._lock:
            self._stop = True
            # A load cannot be interrupted, and a failed engine thread may be stuck in a collective: don't wait.
            loading = self._engine_snapshot is None or self._state == FAILED
            if self._state != FAILED:
                self._state = STOPPED
        self._wakeup.set()
        if self._thread is not None and self._thread is not threading.current_thread() and not loading:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests (event loop)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *, timeout: float | None = None
    ) -> RequestOutputStream:
        """Submit now (raising QueueFullError, EngineNotReadyError, EngineDrainingError or ValueError
        at once) and return the request's output stream. The caller must iterate or `aclose()` it.

        After `timeout` seconds an unfinished request is aborted (its KV blocks freed) and its stream
        raises RequestTimeoutError, whatever it waits for: the engine, or a client that stopped reading."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        with self._lock:
            if self._state == DRAINING:
                raise EngineDrainingError("the server is shutting down")
            if self._state != READY:
                raise EngineNotReadyError(
                    "the model is still loading" if self._state == LOADING else f"the engine is {self._state}"
                )
            limit = self.max_waiting_requests
            if limit is not None and self._num_waiting_locked() >= limit:
                raise QueueFullError(f"the waiting queue is full ({limit} requests waiting)")
            self._inbox.append(("add", (request_id, prompt, params, time.monotonic())))
            self._queued_adds += 1
        stream = _RequestStream()
        self._streams[request_id] = stream
        if timeout is not None:
            assert self._loop is not None
            self._timers[request_id] = self._loop.call_later(timeout, self._expire, request_id, timeout)
        assert self._idle is not None
        self._idle.clear()
        self._wakeup.set()
        return RequestOutputStream(self, request_id, stream)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's signature: yields cumulative outputs until the request finishes."""
        stream = self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()

    def _release(self, request_id: str, *, abort: bool) -> None:
        """A stream is done (event-loop thread): forget it, abort the request if it is unfinished."""
        self._streams.pop(request_id, None)
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        if abort:
            self.abort(request_id)
        if not self._streams and self._idle is not None:
            self._idle.set()

    def _expire(self, request_id: str, timeout: float) -> None:
        self._timers.pop(request_id, None)
        stream = self._streams.get(request_id)
        if stream is None:
            return
        logger.warning("request %s timed out after %.0f s: aborted", request_id, timeout)
        stream.put(RequestTimeoutError(f"the request did not finish within the server's timeout ({timeout:g} s)"))
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe; unknown ids are ignored)."""
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wakeup.set()

    # ------------------------------------------------------------------ state (any thread)

    def snapshot(self) -> EngineSnapshot | None:
        """Engine state with requests still in the inbox counted as waiting (exact at any instant)."""
        with self._lock:
            base = self._engine_snapshot
            if base is None:
                return None
            return replace(base, num_waiting=self._num_waiting_locked())

    def num_in_flight(self) -> int:
        return len(self._streams)

    def _num_waiting_locked(self) -> int:
        base = self._engine_snapshot.num_waiting if self._engine_snapshot else 0
        return base + self._queued_adds + self._adds_in_flight

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            engine = self._engine_factory(self.config)
            self._adopt(engine)
        except BaseException as exc:
            logger.exception("model loading failed")
            self.load_error = exc
            with self._lock:
                self._state = FAILED
            self._call_in_loop(self._set_loaded, exc)
            return
        with self._lock:
            if self._state == LOADING:
                self._state = READY
        self._call_in_loop(self._set_loaded, None)
        logger.info("model %s loaded; engine ready", self.served_model_name)
        try:
            self._loop_forever(engine)
        except BaseException:
            logger.exception("the engine loop crashed")
            with self._lock:
                self._state = FAILED
            self._call_in_loop(self._fail_all_streams, RequestAbortedError("the engine stopped"))

    def _adopt(self, engine: LLMEngine) -> None:
        self.served_model_name = self.served_model_name or engine.served_model_name
        self.max_model_len = engine.max_model_len
        model_config = getattr(engine, "model_config", None)
        self.eos_token_ids = list(getattr(model_config, "eos_token_ids", []) or [])
        self.vocab_size = getattr(model_config, "vocab_size", None)
        workers = getattr(getattr(engine, "runner", None), "workers", None)
        if workers is not None:
            workers.on_worker_death(self._engine_lost)
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:  # a tokenizer that cannot be copied is shared (fast tokenizers are read-only here)
            self.tokenizer = engine.tokenizer
        self._publish(engine)

    def _engine_lost(self, reason: str) -> None:
        """Any thread: the engine can never serve again. Fail every request now (the engine thread may be
        stuck in a collective and never return) and tell the server, which exits non-zero."""
        with self._lock:
            self._state = FAILED
        self._call_in_loop(self._fail_all_streams, RequestAbortedError(reason))
        self._call_in_loop(self._set_fatal, reason)

    def _set_fatal(self, reason: str) -> None:
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(reason)

    def _loop_forever(self, engine: LLMEngine) -> None:
        while True:
            with self._lock:
                commands = list(self._inbox)
                self._inbox.clear()
                self._adds_in_flight += self._queued_adds
                self._queued_adds = 0
                stop = self._stop
                if not commands and not stop:
                    self._wakeup.clear()
            if stop:
                self._abort_everything(engine)
                engine.shutdown()
                return
            if commands:
                self._apply(engine, commands)
                self._publish(engine)
            if engine.has_unfinished_requests():
                self._step(engine)
            elif not commands:
                self._wakeup.wait()

    def _apply(self, engine: LLMEngine, commands: list[tuple[str, Any]]) -> None:
        accepted = []
        for kind, payload in commands:
            if kind == "add":
                request_id, prompt, params, arrival = payload
                try:
                    engine.add_request(request_id, prompt, params)
                except Exception as exc:  # bad input: surface to the caller, keep serving
                    error = exc if isinstance(exc, ValueError) else ValueError(str(exc))
                    with self._lock:  # no longer waiting: the caller may count the queue as soon as it hears
                        self._adds_in_flight -= 1
                    self._call_in_loop(self._deliver_error, request_id, error)
                    continue
                self._trackers[request_id] = _Tracker(arrival=arrival)
                accepted.append(request_id)
            else:
                engine.abort_request(payload)
                tracker = self._trackers.pop(payload, None)
                if tracker is not None:
                    self._finish(payload, tracker, "abort", None, prompt_tokens=None, completion_tokens=None)
        if accepted:
            self._call_in_loop(self._accept, accepted)

    def _step(self, engine: LLMEngine) -> None:
        from kubeinfer.engine.llm_engine import EngineDeadError

        try:
            outputs = engine.step()
        except EngineDeadError:
            raise  # the loop ends: state "failed", /health 503, every stream gets an error
        except Exception:
            logger.exception("engine step failed; aborting the requests in flight")
            ids = list(self._trackers)
            engine.abort_request(ids)
            self._trackers.clear()
            self._publish(engine)
            self._call_in_loop(self._fail_all_streams, RequestAbortedError("the engine step failed"))
            return
        now = time.monotonic()
        for output in outputs:
            self._track(output, now)
        self._publish(engine)
        if outputs:
            self._call_in_loop(self._deliver, outputs)

    def _track(self, output: RequestOutput, now: float) -> None:
        tracker = self._trackers.get(output.request_id)
        if tracker is None:
            return
        tokens = len(output.outputs[0].token_ids) if output.outputs else 0
        new_tokens = tokens - tracker.num_tokens
        if new_tokens > 0:
            if tracker.first_token is None:
                tracker.first_token = now
                self.metrics.observe_first_token(now - tracker.arrival)
                new_tokens -= 1
            if new_tokens > 0 and tracker.last_token is not None:
                self.metrics.observe_token_interval((now - tracker.last_token) / new_tokens, new_tokens)
            tracker.last_token = now
            tracker.num_tokens = tokens
        if output.finished:
            del self._trackers[output.request_id]
            reason = (output.outputs[0].finish_reason if output.outputs else None) or "stop"
            self._finish(
                output.request_id,
                tracker,
                reason,
                output,
                prompt_tokens=len(output.prompt_token_ids or []),
                completion_tokens=sum(len(c.token_ids) for c in output.outputs),
            )

    def _finish(
        self,
        request_id: str,
        tracker: _Tracker,
        reason: str,
        output: RequestOutput | None,
        *,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        now = time.monotonic()
        queue_s = None
        metrics = getattr(output, "metrics", None)
        first_scheduled = getattr(metrics, "first_scheduled_time", None)
        engine_arrival = getattr(metrics, "arrival_time", None)
        if first_scheduled is not None and engine_arrival is not None:
            queue_s = first_scheduled - engine_arrival
        per_token = None
        if tracker.first_token is not None and tracker.last_token is not None and tracker.num_tokens > 1:
            per_token = (tracker.last_token - tracker.first_token) / (tracker.num_tokens - 1)
        self.metrics.observe_finished(reason, now - tracker.arrival, queue_s, per_token)
        if self.log_requests:
            ttft = None if tracker.first_token is None else round(tracker.first_token - tracker.arrival, 4)
            request_logger.info(
                "request finished",
                extra={
                    "request": {
                        "request_id": request_id,
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "ttft_s": ttft,
                        "latency_s": round(now - tracker.arrival, 4),
                        "finish_reason": reason,
                    }
                },
            )

    def _abort_everything(self, engine: LLMEngine) -> None:
        if self._trackers:
            engine.abort_request(list(self._trackers))
            self._trackers.clear()
        self._publish(engine)

    def _publish(self, engine: LLMEngine) -> None:
        stats = engine.get_stats()
        snapshot = EngineSnapshot(
            num_waiting=int(stats.num_waiting),
            num_running=int(stats.num_running),
            kv_cache_usage=float(stats.kv_cache_usage),
            num_gpu_blocks=int(stats.num_gpu_blocks),
            block_size=int(stats.block_size),
            num_preemptions_total=int(getattr(stats, "num_preemptions_total", 0)),
            prefix_cache_queries_total=int(getattr(stats, "prefix_cache_queries_total", 0)),
            prefix_cache_hits_total=int(getattr(stats, "prefix_cache_hits_total", 0)),
            prompt_tokens_total=int(getattr(stats, "prompt_tokens_total", 0)),
            generation_tokens_total=int(getattr(stats, "generation_tokens_total", 0)),
            enable_prefix_caching=bool(getattr(self.config, "enable_prefix_caching", False)),
            cache_dtype=str(getattr(self.config, "kv_cache_dtype", "auto")),
            **_weight_fields(engine),
        )
        with self._lock:
            self._engine_snapshot = snapshot
            self._adds_in_flight = 0

    def _call_in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed after the check (shutdown)
            loop.call_soon_threadsafe(callback, *args)

    # ------------------------------------------------------------------ event-loop callbacks

    def _set_loaded(self, error: BaseException | None) -> None:
        assert self._loaded is not None
        if self._loaded.done():
            return
        if error is None:
            self._loaded.set_result(None)
        else:
            self._loaded.set_exception(error)
            self._loaded.exception()  # mark retrieved: the server reports it itself

    def _accept(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.accepted.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                error = getattr(output, "error", None)
                stream.put(output if error is None else RequestFailedError(error))

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)

    def _fail_all_streams(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)


def _weight_fields(engine: LLMEngine) -> dict[str, Any]:
    """The snapshot's weight fields from the model runner (absent on engines without one, e.g. test doubles)."""
    runner = getattr(engine, "runner", None)
    report = getattr(runner, "weight_report", None)
    if report is None:
        return {}
    return {"quantization": str(runner.quantization), "weight_types": "/".join(report.qtypes),
            "weight_bytes": int(report.total_bytes)}
