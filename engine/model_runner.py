"""The model runner: loads the model, owns the KV cache, turns a scheduled step into logits.

Each step's sequences become one flat batch with no padding (input ids, positions, slot
mapping, block tables, context lengths). Python work per step is O(number of sequences) plus
O(new tokens): every sequence keeps a numpy copy of its block table that only ever receives its
new blocks, and decode rows are a couple of list appends. Logits are computed only for the last
token of each sequence that samples this step; the engine's sampler turns them into tokens.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from kubeinfer.engine import cpu_replay, faults
from kubeinfer.engine.attention_metadata import AttentionMetadata
from kubeinfer.engine.config import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    DEFAULT_CPU_MAX_MODEL_LEN,
    DEFAULT_GPU_MAX_MODEL_LEN,
    EngineConfig,
)
from kubeinfer.engine.core.scheduler import ScheduledSeq
from kubeinfer.engine.cuda_graphs import (
    MAX_CAPTURE_BATCH_SIZE,
    MAX_CPU_REPLAY_BATCH_SIZE,
    DecodeGraphs,
    graphs_off_reason,
)
from kubeinfer.engine.distributed.workers import WorkerGroup, init_tensor_parallel
from kubeinfer.engine.layers import cpu_kernels
from kubeinfer.engine.ports import free_port
from kubeinfer.engine.prompt_logprobs import PromptLogprobRows, PromptScores, score_prompt_rows
from kubeinfer.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class _BlockTableMirror:
    """A sequence's block table as a growing int32 array (only new entries are copied in)."""

    array: np.ndarray
    synced: int = 0
    block_ids: list[int] | None = None  # the list object last mirrored (a new list = start over)

    def sync(self, table: list[int]) -> np.ndarray:
        if table is not self.block_ids:
            self.block_ids, self.synced = table, 0
        n = len(table)
        if n > self.array.shape[0]:
            grown = np.zeros(max(n, 2 * self.array.shape[0]), dtype=np.int32)
            grown[: self.synced] = self.array[: self.synced]
            self.array = grown
        if n > self.synced:
            self.array[self.synced:n] = table[self.synced:n]
            self.synced = n
        return self.array


def _mirror(seq: Sequence) -> np.ndarray:
    mirror: _BlockTableMirror | None = seq.runner_state
    if mirror is None:
        mirror = seq.runner_state = _BlockTableMirror(np.zeros(max(16, len(seq.block_table)), dtype=np.int32))
    return mirror.sync(seq.block_table)


@dataclass
class HostBatch:
    """One step's flat batch in host memory: what rank 0 builds and every rank moves to its device."""

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    block_tables: np.ndarray  # int32 [B, blocks]
    query_lens: list[int]
    seq_lens: list[int]
    block_size: int

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        def move(array: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(array)
            return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)

        query_start = np.zeros(len(self.query_lens) + 1, dtype=np.int32)
        np.cumsum(self.query_lens, out=query_start[1:])
        md = AttentionMetadata(
            slot_mapping=move(self.slot_mapping), query_start_loc=move(query_start),
            seq_lens=move(np.asarray(self.seq_lens, dtype=np.int32)), block_tables=move(self.block_tables),
            max_query_len=max(self.query_lens), max_seq_len=max(self.seq_lens), block_size=self.block_size,
            query_lens_cpu=self.query_lens, seq_lens_cpu=self.seq_lens)
        return move(self.input_ids), move(self.positions), md


def kv_cache_torch_dtype(chosen: str, model_dtype: torch.dtype) -> torch.dtype:
    """A ``--kv-cache-dtype`` value as a torch dtype: auto is the model's."""
    return model_dtype if chosen == "auto" else getattr(torch, chosen)


def _device_of_rank(config: EngineConfig, rank: int) -> torch.device:
    device = torch.device(config.resolved_device())
    if device.type == "cuda" and config.tensor_parallel_size > 1:
        return torch.device("cuda", rank)
    return device


class ModelRunner:
    """Rank 0 of the engine (the only one that schedules and samples) or, with ``rank > 0``, one of its
    tensor-parallel workers (``distributed/workers.py``)."""

    # Calls a worker answers (the others run without a reply, so a step costs one message per worker).
    REPLYING_CALLS = frozenset({"kv_cache_budget", "allocate_kv_cache"})

    def __init__(self, config: EngineConfig, rank: int = 0, port: int | None = None) -> None:
        from kubeinfer.engine.models.loader import load_model

        self.config = config
        self.rank, self.world_size = rank, config.tensor_parallel_size
        self.device = _device_of_rank(config, rank)
        self.workers: WorkerGroup | None = None
        if self.world_size > 1:
            if rank == 0:
                port = free_port()
                self.workers = WorkerGroup(config, port)
            assert port is not None
            init_tensor_parallel(rank, self.world_size, port, self.device)
        try:
            loaded = load_model(config.model, dtype=config.dtype, device=self.device, revision=config.revision,
                                tp_rank=rank, tp_size=self.world_size, quantization=config.quantization)
        except BaseException:
            self.shutdown()
            raise
        self.model = loaded.model
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.quantization, self.weight_report = loaded.quantization, loaded.weights
        self.block_size = config.block_size
        self.vocab_size = self.model_config.vocab_size
        self.num_kv_heads = self.model.num_kv_heads_per_rank
        self.max_model_len = self._resolve_max_model_len()
        self.timings: dict[str, float] = defaultdict(float)  # seconds per phase, summed over steps
        self.num_steps = 0
        torch.manual_seed(config.seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.decode_graphs: DecodeGraphs | None = None  # CUDA graphs of decode steps (GPU, rank 0 only)
        self.cuda_graphs_off: str | None = None  # why decode runs eagerly (None: graphs on)
        if rank == 0:
            try:
                if self.workers is not None:
                    self.workers.results()  # every shard loaded
                self.num_blocks = self._determine_num_blocks()
                self._on_all_ranks("allocate_kv_cache", self.num_blocks)
                self.cuda_graphs_off = graphs_off_reason(config, self.device, self.world_size)
                if self.cuda_graphs_off is None:
                    self.enable_decode_graphs()
                else:
                    logger.info("decode steps run without CUDA graphs: %s", self.cuda_graphs_off)
            except BaseException:
                self.shutdown()
                raise

    def _on_all_ranks(self, method: str, *args: Any) -> tuple[Any, list[Any]]:
        """Run ``method`` on every rank (the workers first, so all enter its collectives): rank 0's result
        and, for a replying call, the workers' (which raises if one of them failed)."""
        if self.workers is not None:
            self.workers.call(method, *args)
        result = getattr(self, method)(*args)
        if self.workers is not None and method in self.REPLYING_CALLS:
            return result, self.workers.results()
        return result, []

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op without them); safe to call twice."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ---- sizing ---------------------------------------------------------------------------
    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.config.max_model_len is None:
            cap = DEFAULT_CPU_MAX_MODEL_LEN if self.device.type == "cpu" else DEFAULT_GPU_MAX_MODEL_LEN
            return min(limit, cap)
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len={self.config.max_model_len} is larger than the model's "
                             f"max_position_embeddings={limit}")
        return self.config.max_model_len

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """``--kv-cache-dtype``: auto is the model's dtype. The CPU kernels read and write any of the three
        dtypes whatever the activations'; the GPU kernels need the model's own."""
        chosen = self.config.kv_cache_dtype
        dtype = kv_cache_torch_dtype(chosen, self.model_config.dtype)
        if dtype != self.model_config.dtype and self.device.type != "cpu":
            raise ValueError(f"kv_cache_dtype={chosen} differs from the model's dtype "
                             f"({str(self.model_config.dtype).removeprefix('torch.')}): only the CPU kernels "
                             "keep the KV cache in another dtype; use auto on a GPU")
        return dtype

    @property
    def kv_element_size(self) -> int:
        return torch.empty((), dtype=self.kv_cache_dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        """One block's K and V over all layers, on this rank (its share of the KV heads)."""
        cfg = self.model_config
        return 2 * cfg.num_layers * self.block_size * self.num_kv_heads * cfg.head_dim * self.kv_element_size

    def _determine_num_blocks(self) -> int:
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        own, others = self._on_all_ranks("kv_cache_budget")  # every rank measures its own device
        budget = min([own, *others])
        num_blocks = int(budget // self.bytes_per_block)
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) is smaller than one block "
                             f"({self.bytes_per_block} bytes); raise kv_cache_memory or gpu_memory_utilization")
        return num_blocks

    def kv_cache_budget(self) -> int:
        """Bytes this rank can give its KV cache (the same on every rank on the CPU)."""
        if self.device.type == "cuda":
            return self._profile_cuda_budget()
        # Enough for every sequence at full length, but never more than the budget.
        full_need = self.max_model_len * self.config.max_num_seqs // self.block_size * self.bytes_per_block
        return self.config.kv_cache_bytes() or min(DEFAULT_CPU_KV_CACHE_BYTES, full_need)

    @torch.inference_mode()
    def _profile_cuda_budget(self) -> int:
        """GPU bytes left for the KV cache after weights and the activations of a full-budget step."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        in_use = total - free
        allocated_before = torch.cuda.memory_allocated(self.device)
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        caches = self._allocate_kv_cache(num_blocks)
        kv_bytes = num_blocks * self.bytes_per_block
        block_table = torch.arange(num_blocks, dtype=torch.int32, device=self.device).unsqueeze(0)
        md = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=block_table, max_query_len=num_tokens, max_seq_len=num_tokens,
            block_size=self.block_size, query_lens_cpu=[num_tokens], seq_lens_cpu=[num_tokens])
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), md, caches)
        self.model.compute_logits(hidden[-min(self.config.max_num_seqs, num_tokens):])
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - allocated_before - kv_bytes
        del caches, hidden
        torch.cuda.empty_cache()
        budget = int(total * self.config.gpu_memory_utilization - in_use - activations)
        logger.info("GPU memory: total %.2f GiB, in use %.2f GiB, activations %.2f GiB, KV budget %.2f GiB",
                    total / 2**30, in_use / 2**30, activations / 2**30, budget / 2**30)
        return max(budget, 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self._allocate_kv_cache(num_blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (attention reads a partial block's unwritten slots: NaN garbage there would poison it)."""
        cfg = self.model_config
        shape = (num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim)
        if self.device.type != "cpu":
            return [(torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                     torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)) for _ in range(cfg.num_layers)]
        # On the CPU one zeroed buffer with every page touched now: the RAM is committed at start-up, so a
        # KV budget the machine (or the pod's memory limit) cannot hold fails here rather than under load,
        # and decode steps pay no first-touch page faults (~5 us per page on a VM; bf16 offline bench +3%).
        per_tensor = num_blocks * self.block_size * self.num_kv_heads * cfg.head_dim
        buffer = torch.from_numpy(np.zeros(2 * cfg.num_layers * per_tensor * self.kv_element_size, dtype=np.uint8))
        buffer[:: mmap.PAGESIZE] = 0
        flat = buffer.view(self.kv_cache_dtype).view(cfg.num_layers, 2, *shape)
        return [(flat[i, 0], flat[i, 1]) for i in range(cfg.num_layers)]

    def enable_decode_graphs(self, emulate: bool = False) -> None:
        """Capture the decode graphs (``emulate``: re-run the captured Python instead, to check the padding and
        static buffers on the CPU; see ``cuda_graphs``)."""
        start = time.perf_counter()
        cap = MAX_CPU_REPLAY_BATCH_SIZE if self.device.type == "cpu" else MAX_CAPTURE_BATCH_SIZE
        graphs = DecodeGraphs(
            lambda ids, positions, md: self.model(ids, positions, md, self.kv_caches), device=self.device,
            max_batch_size=min(self.config.max_num_seqs, cap),
            max_blocks_per_seq=-(-self.max_model_len // self.block_size), block_size=self.block_size,
            max_seq_len=self.max_model_len, emulate=emulate)
        try:
            graphs.capture()
        except cpu_replay.ReplayUnsupported as why:
            self.cuda_graphs_off = f"the decode step cannot be recorded: {why}"
            logger.info("decode steps run eagerly: %s", self.cuda_graphs_off)
            return
        self.decode_graphs, self.cuda_graphs_off = graphs, None
        kind = "CPU recordings" if self.device.type == "cpu" and not emulate else "CUDA graphs"
        logger.info("decode %s%s for batch sizes %s captured in %.1f s", kind,
                    " (emulated)" if emulate else "", graphs.sizes, time.perf_counter() - start)

    # ---- one step -------------------------------------------------------------------------
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def prepare(self, scheduled: list[ScheduledSeq]) -> HostBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        chunks: list[tuple[int, np.ndarray, np.ndarray]] = []  # (offset, positions, slots) of prefills
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[np.ndarray] = []
        for item in scheduled:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            table = _mirror(seq)
            tables.append(table)
            query_lens.append(n)
            seq_lens.append(start + n)
            if n == 1:
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(int(table[start // bs]) * bs + start % bs)
            else:
                offset = len(input_ids)
                input_ids.extend(seq.token_ids[start:start + n])
                pos = np.arange(start, start + n, dtype=np.int64)
                chunks.append((offset, pos, table[pos // bs].astype(np.int64) * bs + pos % bs))
                positions.extend(range(n))  # placeholders, overwritten below
                slots.extend(range(n))
        pos_np = np.asarray(positions, dtype=np.int64)
        slot_np = np.asarray(slots, dtype=np.int64)
        for offset, pos, slot in chunks:
            pos_np[offset:offset + len(pos)] = pos
            slot_np[offset:offset + len(slot)] = slot
        num_seqs = len(scheduled)
        max_seq_len = max(seq_lens)
        width = -(-max_seq_len // bs)
        block_tables = np.zeros((num_seqs, width), dtype=np.int32)
        for row, (table, seq_len) in enumerate(zip(tables, seq_lens, strict=True)):
            used = -(-seq_len // bs)
            block_tables[row, :used] = table[:used]
        return HostBatch(np.asarray(input_ids, dtype=np.int64), pos_np, slot_np, block_tables, query_lens, seq_lens,
                         bs)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], block_copies: list[tuple[int, int]],
                sample_rows: list[int], prompt_rows: PromptLogprobRows | None = None
                ) -> tuple[torch.Tensor | None, PromptScores | None]:
        """Run one step's forward: the float32 logits ``[len(sample_rows), vocab]`` of the last token of
        each scheduled index in ``sample_rows`` (an ``n > 1`` fork repeats its parent's row), or None;
        and the scores of ``prompt_rows`` for prompt logprobs, from the same forward."""
        for item in scheduled:
            faults.inject("forward", item.seq.params.seed)
        t0 = time.perf_counter()
        batch = self.prepare(scheduled)
        logits_rows = (np.cumsum(batch.query_lens) - 1)[sample_rows] if sample_rows else None
        t1 = time.perf_counter()
        (logits, prompt_scores), _ = self._on_all_ranks("forward_step", batch, block_copies, logits_rows,
                                                        prompt_rows)
        self.timings["prepare"] += t1 - t0
        self.timings["forward"] += time.perf_counter() - t1
        self.num_steps += 1
        return logits, prompt_scores

    @torch.inference_mode()
    def forward_step(self, batch: HostBatch, block_copies: list[tuple[int, int]],
                     logits_rows: np.ndarray | None, prompt_rows: PromptLogprobRows | None = None
                     ) -> tuple[torch.Tensor | None, PromptScores | None]:
        """The model's part of a step, on every rank: the float32 logits of ``logits_rows`` (None: none)
        and the scores of ``prompt_rows``."""
        self.copy_blocks(block_copies)
        if self.decode_graphs is not None and self.decode_graphs.can_run(batch):
            hidden = self.decode_graphs.run(batch)
        else:
            input_ids, positions, md = batch.to_device(self.device)
            hidden = self.model(input_ids, positions, md, self.kv_caches)
        scores = score_prompt_rows(self.model, hidden, prompt_rows) if prompt_rows is not None else None
        logits = None
        if logits_rows is not None:
            rows = torch.as_tensor(logits_rows, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        if self.device.type == "cpu":
            cpu_kernels.park_workers()  # the step's kernels are done
        return logits, scores

    def describe(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size, "device": str(self.device),
                "dtype": str(self.model_config.dtype), "kv_cache_dtype": str(self.kv_cache_dtype),
                "max_model_len": self.max_model_len,
                "kv_cache_bytes": self.num_blocks * self.bytes_per_block,
                "cuda_graphs": self.decode_graphs.sizes if self.decode_graphs else f"off ({self.cuda_graphs_off})"}
