"""A GGUF file as a float32 Hugging Face checkpoint folder, for peers that cannot read GGUF (vLLM's CPU
build in `kubeinfer bench peers`, lm-evaluation-harness' ``hf`` backend in the tests).

transformers dequantises the GGUF on load; a GGUF-loaded model refuses ``save_pretrained``, so its weights
are copied into a model made from the same config. The folder is written once per file (same name and size).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def export_gguf_as_hf(gguf: Path, out: Path) -> Path:
    """Write ``gguf`` as a float32 checkpoint (config, safetensors, tokenizer) into ``out``; returns ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = out / "kubeinfer-source.json"
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    if stamp.exists() and json.loads(stamp.read_text()) == source:
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    (partial / stamp.name).write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out
