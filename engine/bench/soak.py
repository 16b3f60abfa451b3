"""`kubeinfer bench soak`: a bounded mix of good, hostile and broken requests against one server.

For `--minutes`, `--concurrency` clients each send requests drawn from a weighted mix: plain and
streaming completions and chats, streams the client drops after a few chunks, sampling penalties,
structured outputs, prompts too long for the context, bodies over the size limit, and malformed
bodies. Every kind has the statuses it may get; anything else is counted as unexpected and fails
the run. At the end the server must be idle (no running or waiting request, no KV block in use);
its resident memory growth over the run is printed beside that.

    python bench/soak.py --launch --minutes 10 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.bench.serve import WORDS, add_server_options, percentiles, server_for
from prometheus_client.parser import text_string_to_metric_families

Body = dict[str, Any]


@dataclass
class Outcome:
    kind: str
    status: str  # the HTTP status, or "stream-error" / "transport" / "dropped"
    expected: bool
    latency_s: float | None = None  # well-formed requests only
    detail: str = ""


@dataclass
class ServerState:
    running: float
    waiting: float
    kv_usage: float
    rss_bytes: float | None


@dataclass
class SoakReport:
    minutes: float
    concurrency: int
    requests: int
    by_kind_and_status: dict[str, int]
    unexpected: int
    first_unexpected: list[str] = field(default_factory=list)
    well_formed_latency_ms: dict[str, float] = field(default_factory=dict)
    start: ServerState | None = None
    end: ServerState | None = None
    rss_growth_mib: float | None = None
    rss_growth_second_half_mib: float | None = None  # warm-up (caches, allocator pools) is in the first half
    rss_mib_over_time: list[float] = field(default_factory=list)
    idle_at_end: bool = False


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


class Soak:
    """The request kinds (one method each) and the client that sends them."""

    def __init__(self, client: httpx.AsyncClient, model: str, max_model_len: int, body_limit: int) -> None:
        self.client = client
        self.model = model
        self.max_model_len = max_model_len
        self.body_limit = body_limit
        self.kinds: list[tuple[str, int, Callable[[random.Random], Awaitable[Outcome]]]] = [
            ("completion", 6, self.completion),
            ("chat-stream", 6, self.chat_stream),
            ("dropped-stream", 4, self.dropped_stream),
            ("penalised", 3, self.penalised),
            ("constrained", 2, self.constrained),
            ("too-long-prompt", 1, self.too_long_prompt),
            ("oversized-body", 1, self.oversized_body),
            ("malformed", 3, self.malformed),
        ]

    def pick(self, rng: random.Random) -> tuple[str, Callable[[random.Random], Awaitable[Outcome]]]:
        name, _, send = rng.choices(self.kinds, weights=[w for _, w, _ in self.kinds])[0]
        return name, send

    # -- well-formed ----------------------------------------------------------------------------

    async def _post(self, kind: str, path: str, body: Body, ok: set[int]) -> Outcome:
        start = time.perf_counter()
        response = await self.client.post(path, json=body)
        latency = time.perf_counter() - start
        return Outcome(kind, str(response.status_code), response.status_code in ok, latency,
                       "" if response.status_code in ok else response.text[:200])

    async def completion(self, rng: random.Random) -> Outcome:
        body = {"model": self.model, "prompt": _words(rng, rng.randint(1, 200)),
                "max_tokens": rng.randint(1, 32), "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 99)}
        return await self._post("completion", "/v1/completions", body, {200, 429})

    async def _stream(self, kind: str, body: Body, drop_after: int | None = None) -> Outcome:
        start = time.perf_counter()
        chunks = 0
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Outcome(kind, str(response.status_code), response.status_code == 429,
                               detail=response.text[:200])
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line.startswith('data: {"error"'):
                    return Outcome(kind, "stream-error", False, detail=line[:200])
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    return Outcome(kind, "dropped", True)  # leaving the block closes the connection
        return Outcome(kind, "200", drop_after is None, time.perf_counter() - start)

    def _chat(self, rng: random.Random, **extra: Any) -> Body:
        return {"model": self.model, "messages": [{"role": "user", "content": _words(rng, rng.randint(1, 80))}],
                "max_tokens": rng.randint(4, 48), "stream": True, **extra}

    async def chat_stream(self, rng: random.Random) -> Outcome:
        return await self._stream("chat-stream", self._chat(rng, ignore_eos=True))

    async def dropped_stream(self, rng: random.Random) -> Outcome:
        return await self._stream("dropped-stream", self._chat(rng, max_tokens=64, ignore_eos=True),
                                  drop_after=rng.randint(1, 20))

    async def penalised(self, rng: random.Random) -> Outcome:
        penalties = {"presence_penalty": rng.uniform(-2, 2), "frequency_penalty": rng.uniform(-2, 2),
                     "repetition_penalty": rng.uniform(0.5, 2), "logit_bias": {str(rng.randint(0, 1000)): -100}}
        return await self._stream("penalised", self._chat(rng, temperature=0.7, **penalties))

    async def constrained(self, rng: random.Random) -> Outcome:
        schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
                  "required": ["answer"], "additionalProperties": False}
        formats = [
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
            {"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
            {"structured_outputs": {"regex": "[0-9]{1,4}-[a-z]{2}"}},
        ]
        body = {**self._chat(rng, max_tokens=40), "stream": False, **rng.choice(formats)}
        return await self._post("constrained", "/v1/chat/completions", body, {200, 429})

    # -- rejected ---------------------------------------------------------------------------------

    async def too_long_prompt(self, rng: random.Random) -> Outcome:
        body = {"model": self.model, "prompt": _words(rng, self.max_model_len + 10), "max_tokens": 4}
        response = await self.client.post("/v1/completions", json=body)
        return Outcome("too-long-prompt", str(response.status_code), response.status_code == 400)

    async def oversized_body(self, rng: random.Random) -> Outcome:
        filler = "x" * (self.body_limit + 1)
        response = await self.client.post("/v1/completions", content=f'{{"prompt": "{filler}"}}'.encode(),
                                          headers={"content-type": "application/json"})
        return Outcome("oversized-body", str(response.status_code), response.status_code == 413)

    async def malformed(self, rng: random.Random) -> Outcome:
        bodies: list[bytes] = [
            b'{"prompt": "unterminated',
            b'{"prompt": "\\ud800", "max_tokens": 2}',
            b'{"prompt": "hi", "max_tokens": "5"}',
            b'{"prompt": "hi", "seed": 123456789012345678901}',
            b'{"prompt": "hi", "temperature": -1}',
            b'{"messages": "not a list"}',
            b"\xff\xfe not utf-8",
            b"[]",
        ]
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        response = await self.client.post(path, content=rng.choice(bodies), headers={"content-type": "application/json"})
        error_shaped = response.status_code == 400 and "error" in response.json()
        return Outcome("malformed", str(response.status_code), error_shaped, detail=response.text[:200])


async def _metric(client: httpx.AsyncClient, names: Sequence[str]) -> dict[str, float]:
    """Sums of the named Prometheus samples (all label sets) from the server's /metrics."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name in names:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def server_state(client: httpx.AsyncClient) -> ServerState:
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "process_resident_memory_bytes")
    values = await _metric(client, names)
    return ServerState(values.get(names[0], -1), values.get(names[1], -1), values.get(names[2], -1),
                       values.get(names[3]))


async def wait_idle(client: httpx.AsyncClient, within_s: float) -> ServerState:
    deadline = time.monotonic() + within_s
    while True:
        state = await server_state(client)
        if (state.running, state.waiting, state.kv_usage) == (0, 0, 0) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace) -> SoakReport:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=30)) as client:
        models = (await client.get("/v1/models")).json()["data"]
        model = args.model or models[0]["id"]
        max_model_len = int(models[0].get("max_model_len") or args.max_model_len)
        runner = Soak(client, model, max_model_len, args.max_request_body_bytes)
        await runner.completion(random.Random(0))  # warm-up
        start_state = await server_state(client)
        deadline = time.monotonic() + args.minutes * 60
        outcomes: list[Outcome] = []

        async def worker(index: int) -> None:
            rng = random.Random(args.seed * 1000 + index)
            while time.monotonic() < deadline:
                kind, send = runner.pick(rng)
                try:
                    outcomes.append(await send(rng))
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    outcomes.append(Outcome(kind, "transport", False, detail=f"{type(exc).__name__}: {exc}"[:200]))

        rss_samples: list[float] = []

        async def sample_rss() -> None:
            while time.monotonic() < deadline:
                state = await server_state(client)
                if state.rss_bytes is not None:
                    rss_samples.append(round(state.rss_bytes / 2**20, 1))
                await asyncio.sleep(max(1.0, args.minutes * 60 / 20))

        await asyncio.gather(sample_rss(), *(worker(i) for i in range(args.concurrency)))
        end_state = await wait_idle(client, within_s=10)
    counts = Counter(f"{o.kind} {o.status}" for o in outcomes)
    unexpected = [o for o in outcomes if not o.expected]
    latencies = [o.latency_s for o in outcomes if o.latency_s is not None and o.expected]
    growth = None
    if start_state.rss_bytes is not None and end_state.rss_bytes is not None:
        growth = round((end_state.rss_bytes - start_state.rss_bytes) / 2**20, 1)
    return SoakReport(
        minutes=args.minutes, concurrency=args.concurrency, requests=len(outcomes),
        by_kind_and_status=dict(sorted(counts.items())), unexpected=len(unexpected),
        first_unexpected=[f"{o.kind} {o.status}: {o.detail}" for o in unexpected[:5]],
        well_formed_latency_ms={**{k: round(v) for k, v in percentiles(latencies).items()},
                                "max": round(max(latencies, default=0) * 1000)},
        start=start_state, end=end_state, rss_growth_mib=growth,
        idle_at_end=(end_state.running, end_state.waiting, end_state.kv_usage) == (0, 0, 0),
        rss_mib_over_time=rss_samples,
        rss_growth_second_half_mib=(round(rss_samples[-1] - rss_samples[len(rss_samples) // 2], 1)
                                    if len(rss_samples) >= 4 else None),
    )


def print_report(report: SoakReport) -> None:
    print(f"soak: {report.minutes} min, {report.concurrency} clients, {report.requests} requests")
    print(f"{'kind':<18}{'status':>14}{'count':>8}")
    for key, count in report.by_kind_and_status.items():
        kind, status = key.split(" ", 1)
        print(f"{kind:<18}{status:>14}{count:>8}")
    latency = report.well_formed_latency_ms
    print(f"well-formed latency ms: p50 {latency.get('p50')}  p99 {latency.get('p99')}  max {latency.get('max')}")
    end = report.end
    assert end is not None
    print(f"at the end: running {end.running:g}, waiting {end.waiting:g}, KV usage {end.kv_usage:g} "
          f"({'idle' if report.idle_at_end else 'NOT IDLE'})")
    if report.rss_growth_mib is not None and report.start and report.start.rss_bytes:
        print(f"server RSS: {report.start.rss_bytes / 2**20:.0f} MiB -> {end.rss_bytes / 2**20:.0f} MiB "
              f"({report.rss_growth_mib:+.1f} MiB; {report.rss_growth_second_half_mib or 0:+.1f} MiB in the second half)")
        print(f"server RSS over time (MiB): {report.rss_mib_over_time}")
    print(f"unexpected responses: {report.unexpected}")
    for line in report.first_unexpected:
        print(f"  {line}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeinfer bench soak", description=__doc__.split("\n\n")[0])
    add_server_options(parser)
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--max-model-len", type=int, default=8192, help="if /v1/models does not say")
    parser.add_argument("--max-request-body-bytes", type=int, default=2 << 20,
                        help="the server's body limit (with --launch it is passed to the server)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here (- for stdout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server_args = f"--max-request-body-bytes {args.max_request_body_bytes} {args.server_args}"
    with server_for(args.base_url, args.launch, server_args) as url:
        args.base_url = url
        report = asyncio.run(soak(args))
    print_report(report)
    if args.json_path:
        write_json(args.json_path, asdict(report))
    return 0 if report.unexpected == 0 and report.idle_at_end else 1


if __name__ == "__main__":
    sys.exit(main())
