"""CUDA graphs for decode steps: each padded batch size captured once, then replayed with the step's
inputs copied into static buffers.

A decode step launches a dozen small kernels per layer; at small batches on a fast GPU launching them
costs more than running them. Replaying one graph per step removes that. Correctness rests on:

* Only pure-decode steps (one new token per sequence) of at most ``max_batch_size`` sequences replay;
  prefills, mixed steps and larger batches run eagerly (``can_run``).
* A batch of B sequences replays the graph of the smallest captured size >= B. Its padding rows get slot
  -1 (no KV write), context length 0 (no KV read), token and position 0; their outputs are dropped.
* Every kernel of the captured forward reads the per-step facts (tokens, positions, slots, lengths, block
  tables) from the static device buffers, never from host values fixed at capture. The Triton attention
  backend is written for that (its ``CUDA_GRAPH_SAFE``); the torch and CPU backends plan each step from
  host copies of the lengths, so with them graphs stay off. Host facts the backend reads at capture
  (``max_seq_len``, here ``max_model_len``) only pick its launch shape (the flash-decoding split count);
  each split's share of a context is computed on the device from the real length.
* Tensor parallelism keeps graphs off (its all-reduces would have to be captured on every rank).

On the CPU the same buffers and padding serve a recording instead of a CUDA graph: each size's forward is
run once under ``cpu_replay.recording()`` and its kernel calls are replayed raw (``cpu_replay``).

``emulate=True`` replays by re-running the captured Python on the static buffers instead of a CUDA graph,
so the padding and buffer logic can be checked on the CPU (with the Triton backend in its interpreter):
what it cannot check is the capture itself, which only ``make gpu-check`` on a GPU does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kubeinfer.engine import cpu_replay
from kubeinfer.engine.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from kubeinfer.engine.config import EngineConfig
    from kubeinfer.engine.model_runner import HostBatch

logger = logging.getLogger(__name__)

MAX_CAPTURE_BATCH_SIZE = 256  # larger decode batches run eagerly (launch cost is small next to their work)
# On the CPU each recorded size keeps its own intermediates (~1.2 MB per sequence for SmolLM2-135M), and at
# 32 sequences the Python a recording removes is ~10% of the step: larger batches run eagerly.
MAX_CPU_REPLAY_BATCH_SIZE = 32

DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to (and including) ``max_batch_size``."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_batch_size} | set(range(16, max_batch_size + 1, 16))
    return sorted(sizes | {max_batch_size})


def graphs_off_reason(config: EngineConfig, device: torch.device, world_size: int) -> str | None:
    """Why decode steps run eagerly with this configuration, or None when they replay CUDA graphs."""
    if config.enforce_eager:
        return "--enforce-eager"
    if device.type not in ("cuda", "cpu"):
        return f"the device is {device.type}, not cuda or cpu"
    if world_size > 1:
        return "tensor parallelism (tensor_parallel_size > 1) runs eagerly"
    from kubeinfer.engine.layers.attention import select_backend

    backend = select_backend(device)
    if device.type == "cpu":  # the recording itself checks the rest (cpu_replay.ReplayUnsupported)
        safe = getattr(backend, "CPU_REPLAY_SAFE", False)
        return None if safe else f"the attention backend {backend.__name__.rsplit('.', 1)[-1]} cannot be recorded"
    if not getattr(backend, "CUDA_GRAPH_SAFE", False):
        return f"the attention backend {backend.__name__.rsplit('.', 1)[-1]} cannot be captured"
    return None


class DecodeGraphs:
    """The captured decode graphs of one model and KV cache, with their static input buffers."""

    def __init__(self, forward: DecodeForward, *, device: torch.device, max_batch_size: int,
                 max_blocks_per_seq: int, block_size: int, max_seq_len: int, emulate: bool = False) -> None:
        self.forward = forward
        self.device = device
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.emulate = emulate
        self.replays = 0  # steps that ran through a graph (tests and the GPU check read it)
        n = self.max_batch_size
        on = {"device": device}
        self.input_ids = torch.zeros(n, dtype=torch.int64, **on)
        self.positions = torch.zeros(n, dtype=torch.int64, **on)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, **on)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, **on)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, **on)  # one token per sequence
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, **on)
        self._graphs: dict[int, Any] = {}  # size -> torch.cuda.CUDAGraph (emulated: the Python to re-run)
        self._outputs: dict[int, torch.Tensor] = {}  # size -> the graph's static output

    def _metadata(self, size: int) -> AttentionMetadata:
        """The static buffers' first ``size`` rows; host facts as the longest context could need."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size], max_query_len=1,
            max_seq_len=self.max_seq_len, block_size=self.block_size, query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.max_seq_len] * size, static_buffers=True)

    def _run_forward(self, size: int) -> torch.Tensor:
        return self.forward(self.input_ids[:size], self.positions[:size], self._metadata(size))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, in one memory pool (the buffers hold padding: no KV is touched).
        On the CPU: record each size's kernel calls (``cpu_replay``; ReplayUnsupported when it cannot)."""
        if self.emulate:
            for size in self.sizes:
                self._graphs[size] = size
            return
        if self.device.type == "cpu":
            for size in self.sizes:
                self._run_forward(size)  # kernels built, caches warm, as for the CUDA capture
                with cpu_replay.recording() as recorded:
                    self._outputs[size] = self._run_forward(size)
                self._graphs[size] = recorded
            return
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compile the Triton kernels and warm cuBLAS up outside the capture
                self._run_forward(size)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._run_forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def can_run(self, batch: HostBatch) -> bool:
        return (bool(self._graphs) and max(batch.query_lens) == 1 and len(batch.query_lens) <= self.max_batch_size
                and batch.block_tables.shape[1] <= self.max_blocks_per_seq)

    @torch.inference_mode()
    def run(self, batch: HostBatch) -> torch.Tensor:
        """The hidden states ``[B, hidden]`` of a decode batch that ``can_run``."""
        num = len(batch.query_lens)
        size = next(s for s in self.sizes if s >= num)

        def padded(array: np.ndarray, fill: int, dtype: np.dtype) -> torch.Tensor:
            out = np.full(size, fill, dtype=dtype)
            out[:num] = array
            return torch.from_numpy(out)

        copy = {"non_blocking": True}
        self.input_ids[:size].copy_(padded(batch.input_ids, 0, np.int64), **copy)
        self.positions[:size].copy_(padded(batch.positions, 0, np.int64), **copy)
        self.slot_mapping[:size].copy_(padded(batch.slot_mapping, -1, np.int64), **copy)
        self.seq_lens[:size].copy_(padded(np.asarray(batch.seq_lens, dtype=np.int32), 0, np.int32), **copy)
        width = batch.block_tables.shape[1]
        # Entries right of ``width`` (and the padding rows) may hold earlier steps' blocks: never read, since
        # the kernels read a row's table only up to its context length (0 for padding rows).
        self.block_tables[:num, :width].copy_(torch.from_numpy(batch.block_tables), **copy)
        self.replays += 1
        if self.emulate:
            return self._run_forward(size)[:num]
        if self.device.type == "cpu":
            cpu_replay.replay(self._graphs[size])
            return self._outputs[size][:num]
        self._graphs[size].replay()
        return self._outputs[size][:num]
