"""`kubeinfer bench head-of-line`: does one huge or hostile request delay everyone else's first token?

For each attack (a 20 MB body, the same chunked, a 1 MB prompt, a 1 MB chat message, an 80 kB prompt
that must be tokenised to be refused) a small streaming request's time to first token is measured
alone and beside the attack in flight, interleaved so that the machine's load drifts over both
equally. The target is a median delay under 100 ms.

    python bench/head_of_line.py --launch --rounds 9 --json hol.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import httpx
from kubeinfer.engine import cpu_features
from kubeinfer.engine.bench.report import write_json
from kubeinfer.engine.bench.serve import add_server_options, server_for

Send = Callable[[httpx.Client], int]
TARGET_DELAY_MS = 100


def first_token_s(url: str, headers: dict[str, str]) -> float:
    body = {"prompt": "Count: one, two,", "max_tokens": 2, "temperature": 0, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the small request got {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                return time.monotonic() - start
    raise RuntimeError("the small request streamed no token")


def first_token_beside(url: str, headers: dict[str, str], send: Send) -> tuple[float, int, float]:
    """TTFT of a small request sent while one big request (started just before) is in flight; also the
    big request's status and duration."""
    result: dict[str, float] = {}

    def big() -> None:
        with httpx.Client(timeout=120) as client:
            start = time.monotonic()
            result["status"] = send(client)
            result["duration"] = time.monotonic() - start

    thread = threading.Thread(target=big, daemon=True)
    thread.start()
    time.sleep(0.02)
    ttft = first_token_s(url, headers)
    thread.join(120)
    return ttft, int(result["status"]), result["duration"]


def _completion(url: str, headers: dict[str, str], prompt_chars: int) -> Send:
    body = json.dumps({"prompt": "hello world " * (prompt_chars // 12), "max_tokens": 1}).encode()
    return lambda c: c.post(f"{url}/v1/completions", content=body, headers=headers).status_code


def _chunked_completion(url: str, headers: dict[str, str], size: int) -> Send:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(size // (1 << 20)):
            yield b"a" * (1 << 20)
        yield b'", "max_tokens": 1}'

    return lambda c: c.post(f"{url}/v1/completions", content=chunks(), headers=headers).status_code


def _chat(url: str, headers: dict[str, str], content_chars: int) -> Send:
    messages = [{"role": "user", "content": "hello world " * (content_chars // 12)}]
    body = json.dumps({"messages": messages, "max_tokens": 1}).encode()
    return lambda c: c.post(f"{url}/v1/chat/completions", content=body, headers=headers).status_code


# name: (make the request for a server URL and headers, the status it must get from a server whose body limit is
# below 20 MB and whose context is below 80k characters' worth of tokens)
ATTACKS: dict[str, tuple[Callable[[str, dict[str, str]], Send], int]] = {
    "20MB body": (lambda url, h: _completion(url, h, 20_000_000), 413),
    "20MB chunked body": (lambda url, h: _chunked_completion(url, h, 20 << 20), 413),
    "1MB prompt": (lambda url, h: _completion(url, h, 1_000_000), 400),
    "1MB chat message": (lambda url, h: _chat(url, h, 1_000_000), 400),
    "80kB prompt (tokenised)": (lambda url, h: _completion(url, h, 80_000), 400),
}


@dataclass
class Measurement:
    attack: str
    statuses: list[int]
    expected_status: int
    ttft_alone_ms: list[float]
    ttft_beside_ms: list[float]
    big_request_ms: list[float]

    @property
    def delay_ms(self) -> float:
        return statistics.median(self.ttft_beside_ms) - statistics.median(self.ttft_alone_ms)


def measure(url: str, attack: str, rounds: int, headers: dict[str, str] | None = None) -> Measurement:
    headers = {"Content-Type": "application/json", **(headers or {})}
    make, expected = ATTACKS[attack]
    send = make(url, headers)
    first_token_s(url, headers)  # warm-up
    result = Measurement(attack, [], expected, [], [], [])
    for _ in range(rounds):  # interleaved, so that the machine's load drifts equally over both
        result.ttft_alone_ms.append(round(first_token_s(url, headers) * 1000, 1))
        ttft, status, duration = first_token_beside(url, headers, send)
        result.statuses.append(status)
        result.ttft_beside_ms.append(round(ttft * 1000, 1))
        result.big_request_ms.append(round(duration * 1000, 1))
    return result


def print_table(rows: list[Measurement]) -> None:
    print(f"CPU: {cpu_features.describe()}")
    header = f"{'attack':<26}{'status':>8}{'TTFT alone':>12}{'beside':>9}{'delay':>8}{'big req':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = "ok" if all(s == r.expected_status for s in r.statuses) else "BAD"
        print(f"{r.attack:<26}{r.expected_status:>5} {ok:<3}{statistics.median(r.ttft_alone_ms):>11.0f} "
              f"{statistics.median(r.ttft_beside_ms):>8.0f}{r.delay_ms:>8.0f}{statistics.median(r.big_request_ms):>9.0f}")
    print(f"(medians in ms; delay = TTFT beside - TTFT alone; target < {TARGET_DELAY_MS} ms)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeinfer bench head-of-line", description=__doc__.split("\n\n")[0])
    add_server_options(parser, server_args="--max-model-len 1024")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--attack", action="append", choices=list(ATTACKS), help="default: all")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here (- for stdout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with server_for(args.base_url, args.launch, args.server_args) as url:
        rows = [measure(url, attack, args.rounds, headers) for attack in args.attack or ATTACKS]
    print_table(rows)
    if args.json_path:
        write_json(args.json_path, [{**asdict(r), "delay_ms": r.delay_ms} for r in rows])
    return 0 if all(s == r.expected_status for r in rows for s in r.statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
