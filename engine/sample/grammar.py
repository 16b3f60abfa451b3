"""Structured outputs with xgrammar: compile a request's constraint once, then one matcher per sequence.

Why xgrammar (measured on SmolLM2's 49k-token vocabulary, 2 shared cores, see ``bench/structured.py`` and
bench/RESULTS.md): its per-step mask for 32 sequences in a JSON schema took 0.14-1.4 ms against
llguidance's 6-11 ms (xgrammar precomputes most of each grammar state's mask at compile time); llguidance
compiles faster (6-22 ms vs 24-77 ms for the schema), but compiled grammars are cached, so the per-step
cost is the one that matters. It also covers every kind vLLM's ``structured_outputs`` has (JSON schema,
regex, choice, EBNF, Lark) and is vLLM's default backend.

- ``GrammarCompiler``: one per engine, for the model's tokenizer and vocabulary size. Building xgrammar's
  tokenizer info costs about a second, so the server starts it in a background thread once the model is
  loaded (offline, the first structured request builds it); compiled
  grammars are kept in an LRU keyed by the constraint (the second request with a schema compiles nothing).
- ``GrammarConstraint``: one sequence's matcher, a ``TokenConstraint`` (``constraints.py``) the sampler owns
  with the rest of the sequence's state (created when the request is added, forked for ``n > 1``, freed when
  the sequence finishes or is aborted). Its state depends only on the tokens it accepted, so a sequence preempted by
  recompute keeps it as is, and prefix caching (which only skips recomputing the prompt) does not touch it.
- ``fill_bitmasks``: the masks of a whole step's constrained rows in one call (xgrammar releases the GIL), so
  the sampler runs it in a worker thread while the forward runs; on a machine with cores to spare a large
  batch goes through xgrammar's batch matcher (C++ threads).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import torch
from kubeinfer.engine.structured_outputs import InvalidGrammarError, StructuredOutputsParams

logger = logging.getLogger(__name__)

_CACHE_SIZE = 256
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] [^:]+:\d+: ")  # "[20:29:48] /project/cpp/x.cc:94: "


def _reason(exc: BaseException) -> str:
    return _XGR_PREFIX.sub("", str(exc).strip()).strip() or type(exc).__name__


class GrammarRejectedToken(RuntimeError):
    """A sampled token the grammar does not allow (a bug: masks prevent it); fails that request alone."""


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, built once (in the background), with an LRU of compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_threads: int = 2) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_token_ids = list(stop_token_ids)
        self._max_threads = max_threads
        self._compiler: Any = None
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, bool], Any] = OrderedDict()
        self.init_seconds: float | None = None
        self.num_compiles = 0

    def start_background_init(self) -> None:
        threading.Thread(target=self._init, name="grammar-init", daemon=True).start()

    def _init(self) -> None:
        with self._lock:
            if self._ready.is_set():
                return
            try:
                import xgrammar as xgr

                t0 = time.perf_counter()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads)
                self.init_seconds = time.perf_counter() - t0
                logger.info("grammar compiler ready in %.2f s", self.init_seconds)
            except BaseException as exc:  # reported to every structured request
                self._init_error = exc
                logger.exception("could not set up the grammar compiler")
            finally:
                self._ready.set()

    def _xgr_compiler(self) -> Any:
        if not self._ready.is_set():
            self._init()
        self._ready.wait()
        if self._init_error is not None:
            raise RuntimeError(f"structured outputs are unavailable: {self._init_error}") from self._init_error
        return self._compiler

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of ``params`` (cached); ``InvalidGrammarError`` with the reason if it does not compile."""
        key = params.cache_key()
        compiler = self._xgr_compiler()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        kind, text, strict = key
        try:
            if kind == "json":
                # No free whitespace: a small model otherwise may emit newlines until max_tokens.
                compiled = compiler.compile_json_schema(text, any_whitespace=False, strict_mode=strict)
            elif kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(text)
            elif kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(params.choice or []))
            elif "::=" in text:
                compiled = compiler.compile_grammar(text)
            else:
                compiled = compiler.compile_lark(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidGrammarError(f"invalid {_what(kind)}: {_reason(exc)}", params.source) from exc
        with self._lock:
            self.num_compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, params: StructuredOutputsParams) -> GrammarConstraint:
        return GrammarConstraint(self.compile(params))


def _what(kind: str) -> str:
    return {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
            "choice": "choice", "grammar": "grammar"}[kind]


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of ``choices``."""
    import json

    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarConstraint:
    """One sequence's grammar matcher; follows the tokens the sequence samples."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled)
        self.num_accepted = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> None:
        if self.matcher.is_terminated():
            return  # the grammar ended with a stop token: the sequence is finishing
        if not self.matcher.accept_token(token_id):
            raise GrammarRejectedToken(f"token {token_id} is not allowed by the grammar here")
        self.num_accepted += 1

    def fork(self) -> GrammarConstraint:
        child = GrammarConstraint.__new__(GrammarConstraint)
        child.compiled, child.matcher, child.num_accepted = self.compiled, self.matcher.fork(), self.num_accepted
        return child

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


_batch_matcher: Any = None


def default_mask_threads() -> int:
    """Threads for a batch's masks: none beside the worker on a small machine (the forward needs its cores; on 2
    cores one matcher at a time took 1.9 ms for 32 rows, the 2-thread batch call 3.0 ms), up to 4 on a large one."""
    return min(4, (os.cpu_count() or 1) // 4)


def fill_bitmasks(constraints: list[GrammarConstraint], bitmask: torch.Tensor, rows: list[int],
                  max_threads: int | None = None) -> None:
    """Write the allowed tokens of every ``constraints[i]`` into ``bitmask[rows[i]]``: xgrammar's batch call
    (C++ threads) for a large batch on a machine with cores to spare, else one matcher after the other."""
    global _batch_matcher
    threads = default_mask_threads() if max_threads is None else max_threads
    if threads < 2 or len(constraints) < 8:
        for constraint, row in zip(constraints, rows, strict=True):
            constraint.fill_bitmask(bitmask, row)
        return
    if _batch_matcher is None:
        import xgrammar as xgr

        _batch_matcher = xgr.BatchGrammarMatcher(max_threads=threads)
    _batch_matcher.batch_fill_next_token_bitmask([c.matcher for c in constraints], bitmask, rows)
