"""`kubeinfer serve`: flags named like `vllm serve`; every flag also from `KUBEINFER_<FLAG>`.

Precedence: command line > environment variable > default. Booleans accept
true/false/1/0/yes/no/on/off in the environment (e.g. `KUBEINFER_ENABLE_PREFIX_CACHING=false`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from kubeinfer.engine.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS

ENV_PREFIX = "KUBEINFER_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _size(value: str) -> int:
    from kubeinfer.engine.config import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _optional_seconds(value: str) -> float | None:
    """Seconds, or 0 / none / off for no limit."""
    if value.strip().lower() in ("", "none", "off") or float(value) == 0:
        return None
    return _positive_float(value)


TOOL_CALL_PARSERS = ["hermes", "qwen", "llama3_json", "mistral"]  # = server/tools/parsers.py's (a test checks)


def build_parser() -> argparse.ArgumentParser:
    from kubeinfer.engine.server.settings import BODY_BYTES_EXTRA, BODY_BYTES_PER_TOKEN, ServerSettings

    defaults = ServerSettings()
    parser = argparse.ArgumentParser(
        prog="kubeinfer serve",
        description="OpenAI-compatible LLM server. Every flag can also be set as KUBEINFER_<FLAG> "
        "(upper case, dashes as underscores), e.g. KUBEINFER_MAX_NUM_SEQS=64.",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help="HF checkpoint dir, .gguf file or Hub repo id (default: the bundled SmolLM2-135M-Instruct)",
    )
    model.add_argument(
        "--served-model-name", default=None, help="model id in the API (default: the model id)"
    )
    model.add_argument("--revision", default=None, help="Hub revision")
    model.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    model.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=QUANTIZATION_METHODS,
        help="how weights are kept: gguf (a .gguf's quantized tensors; the default for a .gguf; on a GPU its "
        "quantized tensors run Triton kernels: 4-bit or byte codes with group scales), int8 (weight-only, "
        "per-channel scales, quantized at load), awq / gptq (a 4-bit AWQ or GPTQ checkpoint; the default for "
        "one, from its quantization_config), fp8 (GPU: e4m3 weights, per-channel scales, quantized at load), "
        "none (full precision); an unsupported combination is an error naming the supported ones",
    )
    model.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="dtype of the KV cache: auto (the model's dtype), or its own; bfloat16 with float32 activations (a "
        "quantized model on the CPU) halves the cache's bytes and what decode attention reads; fp8 is not "
        "supported yet",
    )
    model.add_argument("--max-model-len", type=_positive_int, default=None, help="context length")
    model.add_argument("--seed", type=int, default=0)

    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=_positive_int, default=256, help="sequences per batch")
    engine.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048, help="tokens per step")
    engine.add_argument("--block-size", type=_positive_int, default=16, help="KV cache block size (tokens)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--kv-cache-memory", default=None, help="CPU KV cache budget, e.g. 2GiB (committed at start-up; default: what --max-model-len x --max-num-seqs needs, at most 1GiB)")
    engine.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None)
    engine.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run every step eagerly. Default: on one CUDA GPU, decode steps of up to 256 sequences replay "
        "CUDA graphs captured at start-up (one per padded batch size); on the CPU, decode steps of up to 32 "
        "sequences of a float32 model with quantized weights replay their recorded kernel calls; prefills, "
        "mixed steps and tensor parallelism always run eagerly",
    )

    server = parser.add_argument_group("server")
    server.add_argument("--host", default=defaults.host)
    server.add_argument("--port", type=int, default=defaults.port)
    server.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1/*")
    server.add_argument(
        "--max-waiting-requests",
        type=_positive_int,
        default=defaults.max_waiting_requests,
        help="answer 429 when this many requests already wait (default: no limit)",
    )
    server.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=defaults.drain_timeout,
        help="seconds to finish in-flight requests after SIGTERM",
    )
    server.add_argument(
        "--chat-template",
        default=defaults.chat_template,
        help="chat template (a Jinja file or the template itself) instead of the model's",
    )
    server.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=defaults.enable_auto_tool_choice,
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    server.add_argument(
        "--tool-call-parser",
        default=defaults.tool_call_parser,
        choices=TOOL_CALL_PARSERS,
        help="how tool calls are found in the model's text for tool_choice auto",
    )
    server.add_argument(
        "--max-request-body-bytes",
        type=_size,
        default=defaults.max_request_body_bytes,
        help=f"answer 413 to a larger request body, before reading it (e.g. 4MiB; default: "
        f"{BODY_BYTES_PER_TOKEN} bytes per token of --max-model-len + {BODY_BYTES_EXTRA >> 20} MiB)",
    )
    server.add_argument(
        "--max-header-bytes",
        type=_size,
        default=defaults.max_header_bytes,
        help="answer 431 to a request line + headers larger than this",
    )
    server.add_argument(
        "--request-timeout",
        type=_optional_seconds,
        default=defaults.request_timeout,
        help="abort a request (and free its KV cache) this many seconds after it arrived, and a stream "
        "whose client stops reading (0: no limit)",
    )
    server.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"]
    )
    server.add_argument(
        "--disable-log-requests",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="no per-request log line",
    )
    _apply_env_defaults(parser)
    return parser


def _env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def _apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Environment variables become defaults, so the command line still wins."""
    defaults: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        raw = os.environ.get(_env_name(action))
        if raw is None:
            continue
        try:
            defaults[action.dest] = _convert(action, raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{_env_name(action)}={raw!r}: {exc}")
        if action.help and "(env" not in action.help:
            action.help += f" (env {_env_name(action)})"
    parser.set_defaults(**defaults)


def _convert(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, argparse.BooleanOptionalAction):
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("expected true or false")
    if action.choices is not None and raw not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    if raw == "" and action.default is None:
        return None
    return action.type(raw) if callable(action.type) else raw


SERVER_ONLY = {
    "host",
    "port",
    "api_key",
    "max_waiting_requests",
    "drain_timeout",
    "max_request_body_bytes",
    "max_header_bytes",
    "request_timeout",
    "log_level",
    "disable_log_requests",
    "chat_template",
    "enable_auto_tool_choice",
    "tool_call_parser",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))


# Idle OpenMP threads spin this many iterations (one pause each: ~0.75 ms on Zen 4) before they sleep.
OPENMP_SPIN_COUNT = 30000


def bounded_openmp_spin() -> None:
    """Idle OpenMP threads spin briefly, then sleep, unless the user chose a wait policy or a spin count.

    It matters where torch's OpenMP threads do a step's parallel work (a dense model's linears, and with them
    the C++ kernels' jobs; a quantized model's kernels run on their own pool, ``engine/csrc/work_pool.h``):
    sleeping threads (``OMP_WAIT_POLICY=PASSIVE``) pay a futex wake-up in each of a step's parallel regions;
    libgomp's default spin (300,000) or ``ACTIVE`` keep burning cores between steps, which stalled decode 7x
    when the cores were shared (bench/RESULTS.md, "OpenMP waiting"). Must run before torch loads."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)


def main(argv: Sequence[str] | None = None) -> int:
    bounded_openmp_spin()
    args = parse_args(argv)
    from kubeinfer.engine.server.serve import run_server

    return run_server(args)
