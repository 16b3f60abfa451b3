"""`kubeinfer bench serve`: a streaming load generator for any OpenAI-compatible server.

N prompts at a fixed concurrency (or Poisson arrivals at `--request-rate`), each streamed from
`/v1/completions` (or `/v1/chat/completions`). Reports output tok/s, request/s, TTFT and
inter-token latency (p50/p95/p99) and errors, as a table and optionally JSON.

    kubeinfer bench serve --base-url http://127.0.0.1:8000/v1 --concurrency 1,8,32,64
    kubeinfer bench serve --launch --concurrency 32 --offline   # also: the offline engine, same workload
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import httpx
from kubeinfer.engine.ports import free_port

WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


@dataclass
class Summary:
    mode: str
    concurrency: int | None
    request_rate: float | None
    num_prompts: int
    completed: int
    errors: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float]
    ttft_ms_after_first_wave: dict[str, float]  # requests after the first `concurrency` (no start-up burst)
    itl_ms: dict[str, float]
    tpot_ms_mean: float
    e2e_ms_p50: float
    first_error: str = ""
    server_rss_mib: float = 0.0  # the server's processes after the run (`kubeinfer bench peers` fills it)
    round: int = 1  # `kubeinfer bench peers --rounds`: which turn of the systems this run was


def make_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """Deterministic prompts of about `input_len` tokens (common words are one token each)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(num)]


def make_output_lens(num: int, args: argparse.Namespace) -> list[int]:
    """Fixed `--output-len`, or uniform in [--output-len-min, --output-len] (seeded)."""
    low = args.output_len_min or args.output_len
    rng = random.Random(args.seed + 1)
    return [rng.randint(low, args.output_len) for _ in range(num)]


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * scale

    return {
        "mean": sum(ordered) / len(ordered) * scale,
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
    }


SSE_LINE_LIMIT = 2**22  # bytes: the longest SSE line the client reads (an event with logprobs can be long)

# Errors of a pooled keep-alive connection that the server closed before this request's response.
STALE_CONNECTION_ERRORS = ("ServerDisconnectedError", "ClientOSError")


async def one_request(
    session: aiohttp.ClientSession, args: argparse.Namespace, prompt: str, max_tokens: int
) -> RequestResult:
    """One streamed request, retried once (timed afresh) when a pooled keep-alive connection turns out to be
    closed before any response (llama-server's HTTP library closes a connection after 5 requests), as the
    openai SDK retries connection errors."""
    result = await _one_attempt(session, args, prompt, max_tokens)
    if result.error.startswith(STALE_CONNECTION_ERRORS) and result.ttft == 0.0:  # nothing streamed yet
        result = await _one_attempt(session, args, prompt, max_tokens)
    return result


async def _one_attempt(
    session: aiohttp.ClientSession, args: argparse.Namespace, prompt: str, max_tokens: int
) -> RequestResult:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM's extension: fixed output lengths
    }
    if args.endpoint == "chat":
        path, body["messages"] = "/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/completions", prompt
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with session.post(f"{args.base_url.rstrip('/')}{path}", json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:  # SSE lines
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(raw[6:])
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    text = (
                        choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    )
                    if not text:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    chunks += 1
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:  # (JSONDecodeError: a ValueError)
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = True
    return result


async def run_load(
    args: argparse.Namespace, prompts: list[str], output_lens: list[int], concurrency: int | None
) -> Summary:
    """The prompts streamed at ``concurrency`` (or Poisson arrivals at ``args.request_rate``). The client is
    aiohttp (C HTTP parser): the load generator shares the machine with the server, and httpx's ~110 us of
    CPU per streamed token (against ~45) took ~10% of two cores at 32 streams."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = concurrency or len(prompts)
    semaphore = asyncio.Semaphore(limit)
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=args.timeout)
    connector = aiohttp.TCPConnector(limit=limit + 4)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector,
                                     read_bufsize=SSE_LINE_LIMIT) as session:
        if args.model is None:
            async with session.get(f"{args.base_url.rstrip('/')}/models") as response:
                args.model = (await response.json())["data"][0]["id"]

        async def guarded(prompt: str, max_tokens: int) -> RequestResult:
            async with semaphore:
                return await one_request(session, args, prompt, max_tokens)

        start = time.perf_counter()
        tasks = []
        for prompt, max_tokens in zip(prompts, output_lens, strict=True):
            tasks.append(asyncio.create_task(guarded(prompt, max_tokens)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize("serve", results, duration, concurrency, args.request_rate)


def summarize(
    mode: str, results: list[RequestResult], duration: float, concurrency: int | None, rate: float | None
) -> Summary:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = [r.error for r in results if not r.ok]
    return Summary(
        mode=mode,
        concurrency=concurrency,
        request_rate=rate,
        num_prompts=len(results),
        completed=len(done),
        errors=len(errors),
        duration_s=round(duration, 3),
        request_throughput=round(len(done) / duration, 3),
        output_throughput=round(output_tokens / duration, 2),
        total_token_throughput=round((output_tokens + prompt_tokens) / duration, 2),
        ttft_ms={k: round(v, 1) for k, v in percentiles([r.ttft for r in done]).items()},
        ttft_ms_after_first_wave={
            k: round(v, 1)
            for k, v in percentiles([r.ttft for r in results[concurrency or 0 :] if r.ok]).items()
        },
        itl_ms={k: round(v, 1) for k, v in percentiles([x for r in done for x in r.itls]).items()},
        tpot_ms_mean=round(percentiles(tpots)["mean"], 1),
        e2e_ms_p50=round(percentiles([r.latency for r in done])["p50"], 1),
        first_error=errors[0] if errors else "",
    )


def run_offline(args: argparse.Namespace, prompts: list[str]) -> Summary:
    """The same prompts through the offline engine (`LLM.generate`), for the HTTP-overhead comparison."""
    from kubeinfer.engine import LLM, SamplingParams

    options = json.loads(args.offline_options) if args.offline_options else {}
    llm = LLM(model=args.offline_model, **options)
    lens = make_output_lens(len(prompts), args)
    params = [SamplingParams(max_tokens=n, temperature=args.temperature, ignore_eos=True) for n in lens]
    llm.generate(prompts[:2], params[:2])  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    duration = time.perf_counter() - start
    results = [
        RequestResult(
            ok=True, prompt_tokens=len(o.prompt_token_ids), output_tokens=len(o.outputs[0].token_ids)
        )
        for o in outputs
    ]
    return summarize("offline", results, duration, None, None)


def local_serve_command(port: int, args: list[str]) -> list[str]:
    """`kubeinfer serve` on 127.0.0.1:`port` in this interpreter (the benchmark's and the tests' servers)."""
    return [sys.executable, "-m", "kubeinfer.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]


def wait_until_ready(process: subprocess.Popen, probe_url: str, what: str, timeout_s: float) -> None:
    """Poll ``probe_url`` until it answers 200; raise if ``process`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(probe_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"{what} did not become ready")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it is still there after a minute."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def launch_server(server_args: str) -> tuple[subprocess.Popen, str]:
    """A local `kubeinfer serve` with ``server_args``, once ready: its process and its ``/v1`` base URL."""
    port = free_port()
    command = local_serve_command(
        port, ["--log-level", "warning", "--disable-log-requests", *shlex.split(server_args)]
    )
    process = subprocess.Popen(command, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{url}/ready", "the launched server", timeout_s=600)
    return process, f"{url}/v1"


def add_server_options(parser: argparse.ArgumentParser, server_args: str = "") -> None:
    """The options of a benchmark that drives one server: where it is, or `--launch` one."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (without /v1)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--launch", action="store_true", help="start a local kubeinfer server for the run")
    parser.add_argument("--server-args", default=server_args, help="`kubeinfer serve` flags with --launch")


@contextmanager
def server_for(base_url: str, launch: bool, server_args: str) -> Iterator[str]:
    """The server URL (without ``/v1``) to benchmark: ``base_url``, or a server launched for the block."""
    if not launch:
        yield base_url
        return
    process, url = launch_server(server_args)
    try:
        yield url.removesuffix("/v1")
    finally:
        stop_server(process)


def print_table(rows: list[Summary]) -> None:
    header = (
        f"{'mode':<8}{'conc':>6}{'rate':>7}{'done':>6}{'err':>5}{'req/s':>8}{'out tok/s':>11}"
        f"{'TTFT p50':>10}{'p95':>8}{'p99':>8}{'p95*':>7}{'ITL p50':>9}{'p95':>8}{'p99':>8}{'TPOT':>8}"
    )
    print(header, flush=True)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.mode:<8}{r.concurrency or '-':>6}{r.request_rate or '-':>7}{r.completed:>6}{r.errors:>5}"
            f"{r.request_throughput:>8.2f}{r.output_throughput:>11.1f}"
            f"{r.ttft_ms['p50']:>10.0f}{r.ttft_ms['p95']:>8.0f}{r.ttft_ms['p99']:>8.0f}"
            f"{r.ttft_ms_after_first_wave['p95']:>7.0f}"
            f"{r.itl_ms['p50']:>9.0f}{r.itl_ms['p95']:>8.0f}{r.itl_ms['p99']:>8.0f}{r.tpot_ms_mean:>8.0f}"
        )
    print("(latencies in ms; p95* = TTFT p95 of the requests after the first `conc` ones)", flush=True)
    for r in rows:
        if r.first_error:
            print(f"first error ({r.mode}, c={r.concurrency}): {r.first_error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeinfer bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="default: 2 x concurrency (at least 16)"
    )
    parser.add_argument("--input-len", type=int, default=128, help="words per prompt (about one token each)")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens (with ignore_eos)")
    parser.add_argument(
        "--output-len-min",
        type=int,
        default=None,
        help="with it, each request's max_tokens is uniform in [min, --output-len]",
    )
    parser.add_argument("--concurrency", default="8", help="comma-separated levels, e.g. 1,8,32,64")
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    parser.add_argument("--launch", action="store_true", help="start a local kubeinfer server for the run")
    parser.add_argument("--server-args", default="", help="extra `kubeinfer serve` flags with --launch")
    parser.add_argument(
        "--offline", action="store_true", help="also run the offline engine on the same prompts"
    )
    parser.add_argument("--offline-model", default=None, help="model for --offline (default: bundled)")
    parser.add_argument("--offline-options", default=None, help="EngineConfig fields as JSON for --offline")
    parser.add_argument(
        "--offline-num-prompts",
        type=int,
        default=None,
        help="prompts for --offline (default: those of the largest concurrency)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kubeinfer.engine.server.cli import bounded_openmp_spin

    bounded_openmp_spin()  # the offline run gets the same OpenMP setting as `kubeinfer serve`
    levels = [int(c) for c in str(args.concurrency).split(",") if c]
    process = None
    rows: list[Summary] = []
    try:
        if args.launch:
            process, args.base_url = launch_server(args.server_args)
        for level in levels:
            num = args.num_prompts or max(16, 2 * level)
            prompts = make_prompts(num, args.input_len, args.seed)
            lens = make_output_lens(num, args)
            asyncio.run(run_load(args, prompts[:1], lens[:1], level))  # warm-up (and model discovery)
            rows.append(asyncio.run(run_load(args, prompts, lens, level)))
            if len(levels) > 1:
                print_table(rows[-1:])
    finally:
        if process is not None:
            stop_server(process)
    if args.offline:
        num = args.offline_num_prompts or args.num_prompts or max(16, 2 * max(levels))
        rows.append(run_offline(args, make_prompts(num, args.input_len, args.seed)))
    print()
    print(
        f"workload: {args.endpoint}, input ~{args.input_len} words, "
        f"output {f'{args.output_len_min}..' if args.output_len_min else ''}{args.output_len} tokens, "
        f"temperature {args.temperature}"
    )
    print_table(rows)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(
                {
                    "workload": {k: v for k, v in vars(args).items() if k != "api_key"},
                    "results": [asdict(r) for r in rows],
                },
                f,
                indent=2,
            )
    return 0 if all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
