"""The GPU check's correctness stage: the engine's greedy tokens against transformers', on the GPU.

Each model runs a dozen prompts of mixed lengths with different output lengths (so decode batches shrink
through several captured graph sizes) in float32 and bfloat16, with CUDA graphs and with
``enforce_eager``. transformers runs each prompt alone in the same dtype on the same device.

* float32, tiny random model (argmaxes far from ties): tokens must be equal.
* otherwise (bf16, real weights): tokens must agree up to the first divergence, and there the engine's
  token must be among transformers' top 5 (a near-tie flipped by rounding, not a wrong model).

``--dry-run``: the tiny model on the CPU, float32 and bfloat16 eagerly with the default CPU kernels,
and float32 with emulated graphs over the Triton kernels in the interpreter (``TRITON_INTERPRET=1``
is set for this stage's process).
"""

from __future__ import annotations

import gc
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

TOP_K = 5
BYTE_TOKENS = 256  # the tiny tokenizer's byte ids: prompts stay inside them


@dataclass
class EngineRun:
    model: str
    dtype: str
    device: str
    graphs: str  # on | off (enforce_eager) | emulated
    prompts: int
    exact: int  # prompts whose tokens equal transformers'
    close: int  # prompts that agree up to a top-5 divergence (exact ones included)
    graph_replays: int
    required: str  # exact | close
    ok: bool
    first_divergence: list[int | None]


def prompts_for(vocab: int, count: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(17)]
    prompts = [[*shared, rng.randrange(3, vocab)] for _ in range(3)]  # prefix-cache hits
    while len(prompts) < count:
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))])
    return prompts


def hf_greedy(path: str, gguf: str | None, dtype: torch.dtype, device: str, prompts: list[list[int]],
              lengths: list[int]) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and the logits of every generated position, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    extra = {"gguf_file": gguf} if gguf else {}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).to(device=device, dtype=dtype)
    hf.eval()
    hf.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    results = []
    with torch.no_grad():
        for prompt, n in zip(prompts, lengths, strict=True):
            ids = torch.tensor([prompt], device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            results.append((out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0].float().cpu()))
    del hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def engine_greedy(path: str, dtype: str, device: str, graphs: str, prompts: list[list[int]],
                  lengths: list[int]) -> tuple[list[list[int]], int]:
    from kubeinfer.engine import SamplingParams
    from kubeinfer.engine.config import EngineConfig
    from kubeinfer.engine.layers.attention import BACKEND_ENV
    from kubeinfer.engine.llm_engine import LLMEngine

    previous = os.environ.get(BACKEND_ENV)
    if graphs == "emulated":  # only the Triton backend reads every per-step fact from device memory
        os.environ[BACKEND_ENV] = "triton"
    try:
        engine = LLMEngine(EngineConfig(model=path, dtype=dtype, device=device, enforce_eager=graphs == "off",
                                        num_gpu_blocks_override=512, max_num_seqs=32, max_num_batched_tokens=256))
        runner = engine.runner
        if graphs == "emulated":
            runner.enable_decode_graphs(emulate=True)
        if graphs in ("on", "emulated") and runner.decode_graphs is None:
            raise RuntimeError(f"CUDA graphs were asked for but are off: {runner.cuda_graphs_off}")
        if graphs == "off" and runner.decode_graphs is not None:
            raise RuntimeError("enforce_eager did not turn the CUDA graphs off")
        for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
        replays = runner.decode_graphs.replays if runner.decode_graphs else 0
        runner.shutdown()
        del engine, runner
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return [tokens[f"r{i}"] for i in range(len(prompts))], replays


def compare(got: list[list[int]], reference: list[tuple[list[int], torch.Tensor]]) -> tuple[int, int, list]:
    exact = close = 0
    divergence: list[int | None] = []
    for tokens, (ref_tokens, logits) in zip(got, reference, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), None)
        divergence.append(first)
        if first is None:
            exact += 1
            close += 1
        elif tokens[first] in logits[first].topk(TOP_K).indices.tolist():
            close += 1
    return exact, close, divergence


def check_model(name: str, path: str, gguf: str | None, device: str, plan: list[tuple[str, str, str]],
                vocab: int, num_prompts: int, max_new: int) -> list[EngineRun]:
    """``plan``: (dtype, graphs, required) rows, all over the same prompts."""
    prompts = prompts_for(vocab, num_prompts)
    lengths = [max_new - (i * max_new) // (2 * num_prompts) for i in range(num_prompts)]  # shrinking batches
    references: dict[str, list] = {}
    runs = []
    for dtype, graphs, required in plan:
        if dtype not in references:
            references[dtype] = hf_greedy(path, gguf, getattr(torch, dtype), device, prompts, lengths)
        model_path = str(Path(path) / gguf) if gguf else path
        got, replays = engine_greedy(model_path, dtype, device, graphs, prompts, lengths)
        exact, close, divergence = compare(got, references[dtype])
        ok = (exact if required == "exact" else close) == len(prompts) and (graphs == "off" or replays > 0)
        runs.append(EngineRun(name, dtype, device, graphs, len(prompts), exact, close, replays, required, ok,
                              divergence))
    return runs


def run(dry_run: bool) -> dict[str, Any]:
    import sys

    sys.path.append(str(Path(__file__).resolve().parent.parent))  # the repo root, last: tests.engine.tiny_models
    from kubeinfer.engine.models.bundled import BundledModelMissing, bundled_model_path

    from tests.engine.tiny_models import make_tiny_checkpoint

    runs: list[EngineRun] = []
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(make_tiny_checkpoint("llama", Path(tmp) / "tiny-llama"))
        if dry_run:
            plan = [("float32", "off", "exact"), ("float32", "emulated", "exact"), ("bfloat16", "off", "close")]
            runs += check_model("tiny-llama", tiny, None, "cpu", plan, BYTE_TOKENS, 4, 5)
        else:
            plan = [(d, g, "exact" if d == "float32" else "close")
                    for d in ("float32", "bfloat16") for g in ("on", "off")]
            runs += check_model("tiny-llama", tiny, None, "cuda", plan, BYTE_TOKENS, 12, 24)
            try:
                gguf = bundled_model_path()
            except BundledModelMissing as missing:
                notes.append(f"SmolLM2 skipped: {missing}")
            else:
                plan = [(d, g, "close") for d in ("float32", "bfloat16") for g in ("on", "off")]
                runs += check_model("SmolLM2-135M (bundled)", str(gguf.parent), gguf.name, "cuda", plan, 49152, 12, 32)
    return {"ok": all(r.ok for r in runs), "runs": [asdict(r) for r in runs], "notes": notes}
