"""Our paged forward vs transformers on tiny random checkpoints of every supported flavour (float32)."""

from __future__ import annotations

import pytest
import torch
from kubeinfer.engine.models.loader import load_model
from transformers import AutoModelForCausalLM

from tests.engine.model_harness import generate_paged
from tests.engine.tiny_models import TINY_KINDS, make_tiny_checkpoint

MAX_NEW = 8


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 3, 7, 1)]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_paged_forward_matches_transformers(kind: str, tmp_path) -> None:
    path = make_tiny_checkpoint(kind, tmp_path / kind)
    ours = load_model(str(path), dtype="float32")
    assert ours.config.dtype == torch.float32 and ours.model_id == kind
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    seqs = generate_paged(ours.model, _prompts(), MAX_NEW)
    for seq in seqs:
        prompt = torch.tensor([seq.tokens[:seq.num_prompt]])
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[0, seq.num_prompt:]
        assert seq.generated[:MAX_NEW] == expected.tolist()
        # every computed position's logits, against one full transformers forward
        with torch.no_grad():
            ref = hf(torch.tensor([seq.tokens[:seq.num_computed]])).logits[0]
        torch.testing.assert_close(torch.stack(seq.logits), ref, atol=1e-4, rtol=1e-4)


def test_config_flags(tmp_path) -> None:
    cfgs = {k: load_model(str(make_tiny_checkpoint(k, tmp_path / k)), dtype="float32").config
            for k in ("qwen2", "qwen3", "llama3_rope", "llama_tied")}
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias and cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32
    assert cfgs["llama3_rope"].rope_scaling["rope_type"] == "llama3"
    assert cfgs["llama_tied"].eos_token_ids[0] == 258 and 256 in cfgs["llama_tied"].eos_token_ids
