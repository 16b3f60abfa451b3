"""The bundled SmolLM2 GGUF through our loader vs transformers' own GGUF loader (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubeinfer.engine.models.bundled import BUNDLED_MODEL_ID, bundled_model_path
from kubeinfer.engine.models.gguf_loader import unpermute_qk
from kubeinfer.engine.models.loader import LoadedModel, load_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.engine.model_harness import generate_paged

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model(None, dtype="float32", quantization="none")  # the dequantising loader; kept quantized: test_quantized_model.py


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = bundled_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_config_and_tokens(ours: LoadedModel, hf_tokenizer) -> None:
    cfg = ours.config
    assert ours.model_id == BUNDLED_MODEL_ID
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids[0] == 2 and 0 in cfg.eos_token_ids
    assert ours.tokenizer.chat_template and "<|im_start|>" in ours.tokenizer.chat_template
    text = ours.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours.tokenizer(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
    assert ours.tokenizer.decode(ours.tokenizer("héllo wörld 日本")["input_ids"]) == "héllo wörld 日本"


def test_logits_match_transformers(ours: LoadedModel, hf_model) -> None:
    ids = ours.tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"]
    seq = generate_paged(ours.model, [ids], max_new_tokens=1, chunk=7)[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(torch.stack(seq.logits), ref, atol=2e-4, rtol=1e-4)


def test_greedy_chat_matches_transformers(ours: LoadedModel, hf_model) -> None:
    ids = ours.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = list(ids["input_ids"])
    seq = generate_paged(ours.model, [prompt], max_new_tokens=24, chunk=16, block_size=16)[0]
    ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert seq.generated[:24] == ref[0, len(prompt):].tolist()


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)
