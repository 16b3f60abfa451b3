"""Incremental detokenisation (multi-byte characters split across tokens) and stop strings."""

from __future__ import annotations

import pytest
from kubeinfer.engine.detokenizer import IncrementalDetokenizer, find_stop_string

from tests.engine.tiny_models import make_tiny_tokenizer

TEXT = "héllo 世界 🤖 ok — ünïcödé ∑ done"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()  # byte-level: every UTF-8 byte is its own token


@pytest.mark.parametrize("backend", ["decode_stream", "offsets"])
def test_multibyte_characters_split_across_tokens(tokenizer, backend: str) -> None:
    prompt = tokenizer.encode("Say: ")
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # the multi-byte characters really are split
    detok = IncrementalDetokenizer(tokenizer, prompt)
    if backend == "offsets":
        fallback = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
        fallback.tokenizer, fallback.skip_special_tokens, fallback._stream = tokenizer, True, None
        fallback._tokens = tokenizer.convert_ids_to_tokens(prompt[-6:])
        fallback._prefix_offset, fallback._read_offset = max(len(fallback._tokens) - 5, 0), len(fallback._tokens)
        detok = fallback
    deltas = [detok.step(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT
    assert "" in deltas  # incomplete characters were held back, not emitted broken
    robot = TEXT.index("🤖")
    assert "🤖" in deltas  # the 4-byte character arrives whole in one delta
    assert robot > 0


def test_special_tokens_skipped(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"))
    ids = [*tokenizer.encode("hi"), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert "".join(detok.step(t) for t in ids) == "hi"
    keep = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"), skip_special_tokens=False)
    assert "".join(keep.step(t) for t in ids) == "hi<|im_end|>"


def test_stop_string_found_only_in_new_window_and_cut_exactly() -> None:
    assert find_stop_string("hello wor", 3, ["world"], False) is None
    assert find_stop_string("hello world", 2, ["world"], False) == ("world", 6)
    assert find_stop_string("hello world", 2, ["world"], True) == ("world", 11)
    # an occurrence entirely before the new text was already checked earlier: not matched again
    assert find_stop_string("stop and more", 4, ["stop"], False) is None
    # several stop strings: the earliest wins
    assert find_stop_string("a END b STOP", 12, ["STOP", "END"], False) == ("END", 2)
