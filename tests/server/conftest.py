"""Fixtures: one shared real server (bundled model, API key on) and clients for it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server.helpers import API_KEY, ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server: API key on, default queue, small batch, float32 with float32 activations in the
    quantized kernels (its tests compare greedy text across batch compositions; in bf16, or with int8 activations,
    the batch's row count picks the matmul path, whose rounding can flip a near-tie: not batch invariant, as
    vLLM's bf16 is not). The default int8 activations are served by `int8_activation_server`'s tests."""
    proc = ServerProcess(["--api-key", API_KEY, "--max-num-seqs", "8", "--dtype", "float32"],
                         env={"KUBEINFER_QUANT_ACTIVATIONS": "f32"})
    proc.start(tmp_path_factory.mktemp("server")).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def dense_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The bundled GGUF dequantised to full precision (`--quantization none`); the shared server keeps it
    quantized (the default for a GGUF on the CPU)."""
    proc = ServerProcess(["--api-key", API_KEY, "--max-num-seqs", "8", "--quantization", "none"])
    proc.start(tmp_path_factory.mktemp("dense-server")).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session", params=["gguf", "none"])
def any_client(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A client of the quantized server and of the dense one: tests using it pass on both."""
    import openai

    server = request.getfixturevalue("server" if request.param == "gguf" else "dense_server")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def client(server: ServerProcess):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def int8_activation_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The bundled GGUF with every default: int8 activations where the int8 panels run (AVX-512 VNNI)."""
    proc = ServerProcess(["--api-key", API_KEY, "--max-num-seqs", "8", "--log-level", "info"])
    proc.start(tmp_path_factory.mktemp("int8-server")).wait_ready()
    yield proc
    proc.stop()
