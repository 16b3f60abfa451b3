"""Tensor-parallel worker processes: rank 0 (the engine's own ModelRunner) drives ranks 1..N-1.

Every rank holds its shard of the weights and of the KV cache (its KV heads, the same block ids);
the sharded layers all-reduce / all-gather through ``torch.distributed`` (NCCL on GPU, gloo on CPU).
Only rank 0 schedules and samples: for each collective call it first sends the method name and its
arguments (host-side tensors, a few KB) to every worker over a pipe, then runs the same method
itself, so all ranks enter the same collectives in the same order.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import threading
import weakref
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a rank that died turns a hang into an error after this
_REPLY_TIMEOUT_S = 600.0  # the first reply comes after the worker loaded its shard: minutes for a large model


def init_tensor_parallel(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Join the process group of this engine's ranks (a rendezvous: returns once all have joined)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed (its traceback is in the message)."""


class WorkerGroup:
    """Ranks 1..N-1 of one engine, each a spawned process running ``worker_main``."""

    def __init__(self, config: Any, port: int) -> None:
        world_size = config.tensor_parallel_size
        context = mp.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes: list[mp.process.BaseProcess] = []
        for rank in range(1, world_size):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(config, rank, port, child), daemon=True,
                                      name=f"kubeinfer-tp-{rank}")
            process.start()
            child.close()
            self.connections.append(parent)
            self.processes.append(process)
        # A worker that dies mid-step leaves rank 0 blocked in a collective (up to COLLECTIVE_TIMEOUT): the
        # watchdog sees its process end at once and tells whoever registered (the server fails its requests
        # and exits, so that Kubernetes restarts the pod).
        self._stopping = threading.Event()
        self._death_callbacks: list[Callable[[str], None]] = []
        threading.Thread(target=_watch, args=(self.processes, self._stopping, self._death_callbacks), daemon=True,
                         name="kubeinfer-tp-watchdog").start()
        self._finalizer = weakref.finalize(self, _stop, self.connections, self.processes, self._stopping)

    def on_worker_death(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(message)`` (from the watchdog thread) when a worker process ends unasked."""
        self._death_callbacks.append(callback)

    def call(self, method: str, *args: Any) -> None:
        """Ask every worker to run ``ModelRunner.<method>(*args)`` (rank 0 then runs it too)."""
        for conn in self.connections:
            conn.send((method, args))

    def results(self) -> list[Any]:
        """Each worker's return value of its last call (waits for them)."""
        out = []
        for conn, process in zip(self.connections, self.processes, strict=True):
            if not conn.poll(_REPLY_TIMEOUT_S):
                raise WorkerError(f"tensor-parallel worker {process.name} did not answer")
            status, value = conn.recv()
            if status == "error":
                raise WorkerError(f"tensor-parallel worker {process.name} failed:\n{value}")
            out.append(value)
        return out

    def shutdown(self) -> None:
        self._finalizer()


def _watch(processes: list[mp.process.BaseProcess], stopping: threading.Event,
           callbacks: list[Callable[[str], None]]) -> None:
    ended = multiprocessing.connection.wait([p.sentinel for p in processes])
    if stopping.is_set():
        return
    process = next(p for p in processes if p.sentinel in ended)
    process.join(1)
    message = (f"tensor-parallel worker {process.name} (pid {process.pid}) died (exit code {process.exitcode}); "
               "the engine cannot continue")
    logger.error(message)
    for callback in list(callbacks):
        try:
            callback(message)
        except Exception:
            logger.exception("a worker-death callback failed")


def _stop(connections: list[Connection], processes: list[mp.process.BaseProcess], stopping: threading.Event) -> None:
    stopping.set()
    for conn in connections:
        with contextlib.suppress(OSError, ValueError):  # already gone
            conn.send(("shutdown", ()))
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in connections:
        conn.close()


def worker_main(config: Any, rank: int, port: int, conn: Connection) -> None:
    """One worker: load this rank's shard, then run whatever rank 0 sends until told to stop."""
    import traceback

    from kubeinfer.engine.model_runner import ModelRunner

    try:
        runner = ModelRunner(config, rank=rank, port=port)
        conn.send(("ok", None))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if method == "shutdown":
                break
            result = getattr(runner, method)(*args)
            if method in runner.REPLYING_CALLS:
                conn.send(("ok", result))
    except Exception:
        logger.exception("tensor-parallel worker %d failed", rank)
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()
        logging.shutdown()
        # No interpreter teardown: the C++ static destructors of a process that used gloo and OpenMP
        # sometimes abort at exit ("terminate called without an active exception").
        os._exit(0)
