"""The `kubeinfer` command: `serve`, `bench` and `operator`.

Each subcommand imports its own stack lazily, so `kubeinfer operator` never pulls in torch
and `kubeinfer serve` never pulls in kopf.
"""

from __future__ import annotations

import sys

BENCHMARKS = ("offline", "serve", "soak", "head-of-line", "peers")

USAGE = """usage: kubeinfer <command> [options]

commands:
  serve      run the OpenAI-compatible inference server (like `vllm serve`)
  bench      benchmarks: `kubeinfer bench offline` | `serve` | `soak` | `head-of-line` | `peers`
  operator   run the Kubernetes operator for InferenceModel resources
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from kubeinfer.engine.server.cli import main as serve_main

        return serve_main(rest) or 0
    if command == "bench":
        return _bench(rest)
    if command == "operator":
        from kubeinfer.operator.main import main as operator_main

        return operator_main(rest) or 0
    print(f"kubeinfer: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _bench(args: list[str]) -> int:
    import importlib

    if not args or args[0] not in BENCHMARKS:
        print(f"usage: kubeinfer bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    bench_main = importlib.import_module(f"kubeinfer.engine.bench.{args[0].replace('-', '_')}").main
    return bench_main(args[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
