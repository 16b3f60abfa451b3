"""lm-evaluation-harness against the real server, fully offline, on tasks whose data this test writes.

Its `local-completions` model (loglikelihood requests: token ids, `echo`, `logprobs: 1`, `max_tokens: 1`,
batched prompts; the tokenizer through the server's `/tokenize` and `/tokenizer_info`) must give the
same per-choice loglikelihoods as its `hf` backend on the same fp32 checkpoint, and so the same
accuracy; `local-chat-completions` runs a small generate-until task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.helpers import ServerProcess

pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LOGLIK_ATOL = 1e-3
NAME = "smollm2-hf"

QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a dog have?", ["two", "four", "six", "eight"], 1),
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("Which animal says meow?", ["cow", "dog", "duck", "cat"], 3),
    ("What is 2 + 2?", ["4", "5", "22", "3"], 0),
    (
        "Water freezes at what temperature in Celsius?",
        ["100 degrees", "0 degrees", "50 degrees", "-40 degrees"],
        1,
    ),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
]
GENERATE = [("Say the word yes.", "yes"), ("What is the capital of France?", "Paris")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled GGUF as an fp32 Hugging Face checkpoint (what both backends load)."""
    from kubeinfer.engine.models.bundled import bundled_model_path
    from kubeinfer.engine.models.hf_export import export_gguf_as_hf

    return export_gguf_as_hf(bundled_model_path(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    mc = root / "mc.jsonl"
    mc.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GENERATE))
    (root / "kubeinfer_mc.yaml").write_text(
        f"""task: kubeinfer_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
    )
    (root / "kubeinfer_gen.yaml").write_text(
        f"""task: kubeinfer_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""
    )
    return root


@pytest.fixture(scope="module")
def hf_server(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The same checkpoint served in fp32 (no API key: lm-eval's local models send none by default)."""
    proc = ServerProcess(["--model", str(hf_dir), "--served-model-name", NAME, "--dtype", "float32"])
    proc.start(tmp_path_factory.mktemp("lm_eval_server")).wait_ready()
    yield proc
    proc.stop()


def _evaluate(model, task: str, task_dir: Path, **kwargs):  # type: ignore[no-untyped-def]
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kwargs,
    )


def _per_choice(results) -> list[list[float]]:  # type: ignore[no-untyped-def]
    samples = sorted(results["samples"]["kubeinfer_mc"], key=lambda s: s["doc_id"])
    return [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]


def test_local_completions_loglikelihoods_match_the_hf_backend(
    hf_server: ServerProcess, hf_dir: Path, task_dir: Path
) -> None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    api = LocalCompletionsAPI(
        base_url=f"{hf_server.url}/v1/completions",
        model=NAME,
        tokenizer_backend="remote",  # the server's /tokenizer_info, /tokenize and /detokenize
        tokenized_requests=True,
        batch_size=4,  # several token-id prompts in one request
        num_concurrent=1,
        max_retries=1,
    )
    served = _evaluate(api, "kubeinfer_mc", task_dir)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4)
    reference = _evaluate(hf, "kubeinfer_mc", task_dir)

    got, expected = _per_choice(served), _per_choice(reference)
    assert len(got) == len(QUESTIONS) and all(len(row) == 4 for row in got)
    deltas = [abs(g - e) for gr, er in zip(got, expected, strict=True) for g, e in zip(gr, er, strict=True)]
    print(f"max |delta loglik| vs hf over {len(deltas)} choices: {max(deltas):.2e}")
    assert max(deltas) < LOGLIK_ATOL, (got, expected)
    assert all(v < 0 for row in got for v in row)
    acc = served["results"]["kubeinfer_mc"]["acc,none"]
    assert acc == reference["results"]["kubeinfer_mc"]["acc,none"]
    assert acc > 0.25  # better than chance: the model really is scoring the answers


def test_local_chat_completions_runs_a_generate_until_task(hf_server: ServerProcess, task_dir: Path) -> None:
    from lm_eval.models.openai_completions import LocalChatCompletion

    chat = LocalChatCompletion(
        base_url=f"{hf_server.url}/v1/chat/completions", model=NAME, num_concurrent=1, max_retries=1
    )
    results = _evaluate(chat, "kubeinfer_gen", task_dir, apply_chat_template=True)
    samples = results["samples"]["kubeinfer_gen"]
    assert len(samples) == len(GENERATE)
    for sample in samples:
        [reply] = sample["filtered_resps"]
        assert isinstance(reply, str) and reply.strip(), sample
    assert 0.0 <= results["results"]["kubeinfer_gen"]["exact_match,none"] <= 1.0
