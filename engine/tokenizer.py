"""Tokenizer loading (transformers fast tokenizers) and the set of ids that end generation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Tokens that end a turn or a document in common chat formats; stopping on them is always right.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>", "<|end|>",
              "<end_of_turn>")


def load_tokenizer(path: str | Path, gguf_file: str | None = None, revision: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a checkpoint folder (or from ``gguf_file`` inside ``path``)."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(path), revision=revision, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e


def end_of_generation_ids(tokenizer: PreTrainedTokenizerBase, *declared: Iterable[int] | int | None) -> list[int]:
    """Declared eos ids (config, generation config) + the tokenizer's eos + known end-of-turn tokens, in order."""
    ids: list[int] = []
    for item in (*declared, tokenizer.eos_token_id):
        if item is None:
            continue
        ids.extend([item] if isinstance(item, int) else item)
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    ids.extend(vocab[t] for t in END_TOKENS if t in vocab and t in special)
    return list(dict.fromkeys(int(i) for i in ids))
