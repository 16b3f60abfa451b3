"""Hub repo ids: download config, safetensors and tokenizer files with huggingface_hub."""

from __future__ import annotations

from pathlib import Path

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["consolidated*", "original/*"]


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` (downloaded into the HF cache when a network exists)."""
    from huggingface_hub import snapshot_download
    from kubeinfer.engine.models.loader import ModelNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      ignore_patterns=IGNORE_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, network errors: all end the same way
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e})"
        ) from e
