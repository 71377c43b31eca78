"""Loading tokenizers with a clear message when the hub or the path is not there."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from qa_lightning.errors import ConfigError

OFFLINE_HINT = (
    "Without network access, use a local model directory (model=minilm is the sentence-"
    "transformers all-MiniLM-L6-v2 encoder of the extra qa-lightning[demo]; model=tiny a small "
    "random model with its tokenizer)."
)


def load_tokenizer(name_or_path: str) -> Any:
    """A fast tokenizer (offsets are needed to map answers back to the context)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as error:  # hub and file errors come in many types
        raise ConfigError(
            f"could not load the tokenizer of '{name_or_path}' ({type(error).__name__}: "
            f"{_first_line(error)}). Check model.name_or_path. {OFFLINE_HINT}"
        ) from error
    if not tokenizer.is_fast:
        raise ConfigError(
            f"the tokenizer of '{name_or_path}' is not a fast tokenizer; answer offsets need one."
        )
    return tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
