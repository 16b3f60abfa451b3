"""One request's failure must not hurt another (issue 9, "Isolation"), through a real server.

Faults are injected with the engine's test-only hook (``engine/faults.py``): the server runs with
``KUBEINFER_TEST_FAULTS``, and a request whose ``seed`` is armed fails at that point of the step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.helpers import API_KEY, ServerProcess
from tests.server.test_sampling_api import MODEL, InnocentStream, chat, complete

pytestmark = pytest.mark.timeout(600)

SAMPLE_FAULT, POSTPROCESS_FAULT, FORWARD_FAULT = 9001, 9002, 9003


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(["--api-key", API_KEY, "--max-num-seqs", "8"], env={
        "KUBEINFER_TEST_FAULTS": f"sample={SAMPLE_FAULT},postprocess={POSTPROCESS_FAULT},forward={FORWARD_FAULT}"})
    proc.start(tmp_path_factory.mktemp("faulty")).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(faulty: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{faulty.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize(("seed", "what"), [(SAMPLE_FAULT, "sampling failed"),
                                            (POSTPROCESS_FAULT, "processing the sampled token failed")])
def test_a_request_failing_in_sampling_or_postprocessing_fails_alone(
        faulty: ServerProcess, client: openai.OpenAI, seed: int, what: str) -> None:
    with InnocentStream(client) as innocent, ThreadPoolExecutor(4) as pool:
        bad_chat = pool.submit(chat, client, seed=seed, temperature=1.0, repetition_penalty=1.2)
        bad_completion = pool.submit(complete, client, seed=seed, n=2)
        good = [pool.submit(chat, client, temperature=0), pool.submit(complete, client, seed=1, top_k=5)]
        for future in (bad_chat, bad_completion):
            with pytest.raises(openai.InternalServerError) as info:
                future.result()
            error = info.value.body
            assert info.value.status_code == 500
            assert error["type"] == "server_error" and what in error["message"] and "injected" in error["message"]
            assert set(error) == {"message", "type", "param", "code"}
        for future in good:
            assert future.result().usage.completion_tokens > 0
    innocent.check()
    log = faulty.log_path.read_text() if faulty.log_path else ""
    assert re.search(r"request (chat)?cmpl-[0-9a-f-]+ failed while", log), log[-2000:]
    assert "Traceback" in log and "InjectedFault" in log


def test_a_failing_stream_gets_an_error_event(faulty: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "stream": True, "seed": POSTPROCESS_FAULT}
    with httpx.stream("POST", f"{faulty.url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200  # the failure comes after the headers
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"server_error"' in events[-2] and "injected" in events[-2]


def test_a_failed_forward_fails_its_step_and_the_server_recovers(faulty: ServerProcess,
                                                                 client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        complete(client, seed=FORWARD_FAULT)
    assert "forward failed" in info.value.body["message"]
    assert httpx.get(f"{faulty.url}/health").status_code == 200
    assert complete(client, max_tokens=4, ignore_eos=True).usage.completion_tokens == 4  # it recovered


def test_a_forward_that_keeps_failing_turns_health_to_failed(faulty: ServerProcess, client: openai.OpenAI) -> None:
    """Last in this module: it kills the engine (Kubernetes' liveness probe would restart the pod)."""
    from kubeinfer.engine.llm_engine import MAX_CONSECUTIVE_FORWARD_FAILURES

    for _ in range(MAX_CONSECUTIVE_FORWARD_FAILURES - 1):
        with pytest.raises(openai.InternalServerError):
            complete(client, seed=FORWARD_FAULT)
    with pytest.raises((openai.InternalServerError, openai.APIStatusError)):
        complete(client, seed=FORWARD_FAULT)
    health = httpx.get(f"{faulty.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "failed"
    with pytest.raises(openai.APIStatusError) as info:
        complete(client, max_tokens=2)
    assert info.value.status_code == 503
