"""Model resolution (paths, Hub ids), dtype rules and the errors for bad input."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
from kubeinfer.engine.models import dtype as dtype_mod
from kubeinfer.engine.models import hub
from kubeinfer.engine.models.dtype import resolve_dtype
from kubeinfer.engine.models.loader import ModelNotFoundError, load_model

from tests.engine.model_harness import generate_paged
from tests.engine.tiny_models import make_tiny_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def test_offline_hub_id_names_the_id(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="kubeinfer-test/no-such-model"):
        load_model("kubeinfer-test/no-such-model")


def test_hub_id_loads_the_downloaded_snapshot(monkeypatch, tiny) -> None:
    # No network here: stand in for the download only; the rest of the path is real.
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or tiny)
    loaded = load_model("org/tiny", dtype="float32", revision="main")
    assert loaded.model_id == "org/tiny" and calls[0][0] == "org/tiny" and calls[0][1]["revision"] == "main"
    assert "*.safetensors" in calls[0][1]["allow_patterns"] and calls[0][1]["allow_patterns"] == hub.ALLOW_PATTERNS


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-dir", "missing.gguf"])
def test_unknown_path(name: str) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(name)


def test_unsupported_architecture(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(str(tmp_path))


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expected a \.gguf"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_model(str(tmp_path / "bad.gguf"))


def test_missing_weights(tmp_path, tiny) -> None:
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path))


def test_resolve_dtype(monkeypatch) -> None:
    assert resolve_dtype("float32", None, CUDA) == torch.float32
    assert resolve_dtype("bf16", None, CPU) == torch.bfloat16
    assert resolve_dtype(torch.float16, None, CPU) == torch.float16
    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(dtype_mod, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_dtype("auto", torch.float16, CPU) == expected
    for flags in ("avx2 fma f16c", "avx512f avx512bw avx512vl avx512_vnni",
                  "avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16"):
        monkeypatch.setenv("KUBEINFER_CPU_FLAGS", flags)  # quantized kernels take float32 on every CPU class
        assert resolve_dtype("auto", torch.float16, CPU, quantized=True) == torch.float32, flags
    assert resolve_dtype("auto", torch.float16, CUDA) == torch.float16
    assert resolve_dtype("auto", "bfloat16", CUDA) == torch.bfloat16
    assert resolve_dtype("auto", torch.float32, CUDA) == torch.bfloat16
    assert resolve_dtype("auto", None, CUDA) == torch.bfloat16
    assert resolve_dtype("auto", None, CUDA, quantized=True) == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        resolve_dtype("int8", None, CPU)
    with pytest.raises(ValueError):
        resolve_dtype(torch.int8, None, CPU)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "auto"])
def test_load_in_dtype(dtype: str, tiny) -> None:
    ref = load_model(str(tiny), dtype="float32")
    loaded = load_model(str(tiny), dtype=dtype)
    expected = resolve_dtype(dtype, None, CPU)
    assert loaded.config.dtype == expected
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    prompt = list(range(40, 60))
    low = torch.stack(generate_paged(loaded.model, [prompt], 1)[0].logits)
    full = torch.stack(generate_paged(ref.model, [prompt], 1)[0].logits)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.1 * full.abs().max().item(), rtol=0)
    assert (low.argmax(-1) == full.argmax(-1)).float().mean() >= 0.8
