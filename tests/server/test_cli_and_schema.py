"""No model needed: serve flags and their KUBEINFER_* variables, the OpenAPI schema, error shapes."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from kubeinfer.engine.async_engine import AsyncLLMEngine
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.server.app import build_app
from kubeinfer.engine.server.cli import SERVER_ONLY, build_parser, parse_args
from kubeinfer.engine.server.settings import ServerSettings
from openapi_spec_validator import validate


def test_flags_named_like_vllm_serve() -> None:
    args = parse_args(["--model", "m", "--served-model-name", "s", "--port", "9000", "--max-model-len", "512",
                       "--max-num-seqs", "4", "--max-num-batched-tokens", "256", "--block-size", "32",
                       "--gpu-memory-utilization", "0.5", "-tp", "2", "--dtype", "float32",
                       "--no-enable-prefix-caching", "--api-key", "k", "--max-waiting-requests", "3",
                       "--kv-cache-memory", "1GiB", "--drain-timeout", "5", "--disable-log-requests"])  # fmt: skip
    assert (args.model, args.served_model_name, args.port, args.max_model_len) == ("m", "s", 9000, 512)
    assert (args.tensor_parallel_size, args.enable_prefix_caching, args.api_key) == (2, False, "k")
    assert (args.max_waiting_requests, args.drain_timeout, args.disable_log_requests) == (3, 5.0, True)
    defaults = parse_args([])
    assert (defaults.model, defaults.port, defaults.host, defaults.enable_prefix_caching) == (
        None,
        8000,
        "0.0.0.0",
        True,
    )


def test_every_engine_flag_is_an_engine_config_field() -> None:
    args = vars(parse_args([]))
    engine_fields = {key for key in args if key not in SERVER_ONLY}
    assert engine_fields <= set(EngineConfig.model_fields)
    EngineConfig(**{key: args[key] for key in engine_fields})


def test_environment_variables_set_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEINFER_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("KUBEINFER_API_KEY", "from-env")
    monkeypatch.setenv("KUBEINFER_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("KUBEINFER_DISABLE_LOG_REQUESTS", "yes")
    args = parse_args([])
    assert (args.max_num_seqs, args.api_key, args.enable_prefix_caching, args.disable_log_requests) == (
        7, "from-env", False, True)  # fmt: skip
    assert parse_args(["--max-num-seqs", "9", "--enable-prefix-caching"]).max_num_seqs == 9  # the flag wins
    assert parse_args(["--enable-prefix-caching"]).enable_prefix_caching is True


@pytest.mark.parametrize(("name", "value"), [("KUBEINFER_MAX_NUM_SEQS", "many"),
                                             ("KUBEINFER_ENABLE_PREFIX_CACHING", "maybe"),
                                             ("KUBEINFER_LOG_LEVEL", "loud")])  # fmt: skip
def test_bad_environment_values_are_clear_errors(monkeypatch, capsys, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        build_parser()
    assert name in capsys.readouterr().err


def _app(api_key: str | None = None):  # type: ignore[no-untyped-def]
    engine = AsyncLLMEngine(EngineConfig(), engine_factory=_never_loads)
    return build_app(engine, ServerSettings(api_key=api_key))


def _never_loads(config: EngineConfig):  # type: ignore[no-untyped-def]
    import threading

    threading.Event().wait()  # the engine thread is a daemon: "loading" forever


def test_openapi_schema_is_valid() -> None:
    schema = _app().openapi()
    validate(schema)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics"} <= set(
        schema["paths"])  # fmt: skip


def test_loading_server_answers_probes_and_503() -> None:
    with TestClient(_app(api_key="k")) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 503
        assert http.get("/metrics").status_code == 200
        assert http.get("/v1/models").status_code == 401
        response = http.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["type"] == "service_unavailable"
        assert http.get("/openapi.json").status_code == 200  # docs stay open


@pytest.mark.parametrize(("preset", "expected"), [
    ({}, {"GOMP_SPINCOUNT": "30000", "OMP_WAIT_POLICY": None}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}),
    ({"GOMP_SPINCOUNT": "3000"}, {"GOMP_SPINCOUNT": "3000", "OMP_WAIT_POLICY": None}),
])
def test_openmp_threads_spin_briefly_unless_chosen(monkeypatch, preset, expected) -> None:
    from kubeinfer.engine.server.cli import bounded_openmp_spin

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in preset.items():
        monkeypatch.setenv(name, value)
    bounded_openmp_spin()
    for name, value in expected.items():
        assert os.environ.get(name) == value
