"""Sampler cost per step (engine/sample/): prepare + sample for one step's rows, by feature and batch size.

Every row asks for the same feature; the vocabulary is SmolLM2's (49152) unless ``--vocab`` says
otherwise. Each case runs ``--steps`` steps on fresh random logits (state is recorded as in serving,
so penalty counts grow); the table shows the median and p90 milliseconds per step.

    python bench/sampler.py                    # CPU, batches 1 and 32
    python bench/sampler.py --batch 1 8 32 128 --device cuda --json results.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.sample import Sampler, SampleRow
from kubeinfer.engine.sampling_params import SamplingParams


def cases(vocab: int) -> dict[str, SamplingParams]:
    return {
        "greedy": SamplingParams(temperature=0),
        "random": SamplingParams(temperature=0.8),
        "top_p+top_k": SamplingParams(temperature=0.8, top_p=0.9, top_k=50),
        "seeded": SamplingParams(temperature=0.8, seed=1),
        "penalties": SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5,
                                    repetition_penalty=1.1),
        "logit_bias(20)": SamplingParams(temperature=0.8, logit_bias={t * 97 % vocab: 5.0 for t in range(20)}),
        "allowed_token_ids(100)": SamplingParams(temperature=0.8, allowed_token_ids=list(range(0, vocab, vocab // 100))),
        "logprobs(5)": SamplingParams(temperature=0.8, logprobs=5),
        "everything": SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, seed=2, presence_penalty=0.5,
                                     repetition_penalty=1.1, logit_bias={5: 1.0}, allowed_token_ids=list(range(2000)),
                                     logprobs=5, min_tokens=4),
    }


@dataclass
class Row:
    case: str
    batch: int
    median_ms: float
    p90_ms: float


def run_case(params: SamplingParams, batch: int, vocab: int, steps: int, device: torch.device) -> Row:
    params.all_stop_token_ids = {2}
    sampler = Sampler(vocab, device)
    for seq_id in range(batch):
        sampler.add_sequence(seq_id, params, list(range(seq_id, seq_id + 64)))
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for step in range(steps + 3):
        logits = torch.randn(batch, vocab, device=device, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = [SampleRow(i, params, step) for i in range(batch)]
        out = sampler.sample(logits, sampler.prepare(rows))
        assert not out.failed
        if step >= 3:  # warm-up first
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Row("", batch, statistics.median(times), times[int(0.9 * (len(times) - 1))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows as JSON ('-' = stdout)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"# CPU: {cpu_features.model_name()}; flags: {' '.join(sorted(cpu_features.flags() & {'avx2', 'fma', 'f16c', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}")
    print(f"# device {device}, vocab {args.vocab}, torch threads {torch.get_num_threads()}, {args.steps} steps per case")
    rows = []
    print(f"{'case':<24}{'batch':>6}{'median ms':>11}{'p90 ms':>9}")
    for name, params in cases(args.vocab).items():
        for batch in args.batch:
            row = run_case(params.clone(), batch, args.vocab, args.steps, device)
            row.case = name
            rows.append(row)
            print(f"{name:<24}{batch:>6}{row.median_ms:>11.3f}{row.p90_ms:>9.3f}")
    if args.json:
        write_json(args.json, [asdict(r) for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
