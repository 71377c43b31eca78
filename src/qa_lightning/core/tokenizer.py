"""Loading tokenizers with a clear message when the hub or the path is not there, and checking
that a tokenizer fits its model before any work."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from qa_lightning.core.errors import ConfigError
from qa_lightning.core.plain import plain

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


#: Special tokens that windowing needs: [CLS] labels the windows without the answer, [SEP] ends
#: the question and the context, [PAD] fills batches (names as in ``transformers``).
REQUIRED_SPECIAL_TOKENS = ("cls_token", "sep_token", "pad_token")
#: A tokenizer may have fewer tokens than the model's embedding rows, whose count some models
#: round up (DeBERTa-v3: 128,001 tokens for vocab_size=128,100), but not fewer than this share:
#: a tokenizer that transformers builds for a directory without tokenizer files has only its
#: special tokens (5 for BERT).
MIN_VOCAB_SHARE = 0.9
#: Files a tokenizer is loaded from (any one of them makes a directory hold a tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def tokenizer_misfit(tokenizer: Any, vocab_size: int) -> str | None:
    """Why ``tokenizer`` cannot feed a model with ``vocab_size`` embedding rows, or ``None``."""
    size = len(tokenizer)
    if size > vocab_size:
        return (
            f"it has {size} tokens, more than the model's vocab_size={vocab_size}: token ids "
            f">= {vocab_size} have no embedding"
        )
    if size < MIN_VOCAB_SHARE * vocab_size:
        return f"it has {size} tokens but the model's vocab_size is {vocab_size}"
    missing = [name for name in REQUIRED_SPECIAL_TOKENS if getattr(tokenizer, name, None) is None]
    if missing:
        return f"it has no {', '.join(missing)}, which windowing needs"
    return None


def check_tokenizer_fits(
    tokenizer: Any, tokenizer_source: str | Path, vocab_size: int, model_source: str | Path
) -> None:
    """Raise a :class:`ConfigError` naming the tokenizer's directory and its files when
    ``tokenizer`` does not fit the model (see :func:`tokenizer_misfit`)."""
    problem = tokenizer_misfit(tokenizer, vocab_size)
    if problem is None:
        return
    where = Path(tokenizer_source)
    if where.is_dir():
        present = [name for name in TOKENIZER_FILES if (where / name).is_file()]
        files = (
            f"'{where}' holds {', '.join(present)}"
            if present
            else f"'{where}' holds no tokenizer file ({', '.join(TOKENIZER_FILES)}), so "
            "transformers built a tokenizer of its special tokens only"
        )
    else:
        files = f"'{tokenizer_source}' is not a local directory"
    raise ConfigError(
        f"the tokenizer of '{tokenizer_source}' does not fit the model of '{model_source}': "
        f"{problem}. {files}. Give the tokenizer the model was trained with: copy its files "
        "(tokenizer.json, tokenizer_config.json ...; training writes them to <run dir>/hf_model/) "
        "into the directory, or export the checkpoint again with python -m qa_lightning.export "
        "ckpt_path=... format=hf."
    )


def load_model_config(
    name_or_path: str, config_overrides: Mapping[str, Any] | None = None, purpose: str = ""
) -> Any:
    """The transformers config of ``name_or_path`` (a small file: no weights are loaded),
    updated with ``config_overrides``; ``purpose`` (e.g. ``to check model.keep_layers``) says
    in the error why it was read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, **(plain(config_overrides) or {}))
    except Exception as error:  # hub, file and config errors come in many types
        raise ConfigError(
            f"could not load the model config of '{name_or_path}'"
            f"{f' {purpose}' if purpose else ''} ({type(error).__name__}: {_first_line(error)}). "
            f"Check model.name_or_path (a directory needs its config.json). {OFFLINE_HINT}"
        ) from error


def model_vocab_size(name_or_path: str, config_overrides: Mapping[str, Any] | None = None) -> int:
    """``vocab_size`` of the config of ``name_or_path``, updated with ``config_overrides``."""
    return int(load_model_config(name_or_path, config_overrides).vocab_size)


def load_model_tokenizer(
    tokenizer_name_or_path: str,
    model_name_or_path: str,
    config_overrides: dict[str, Any] | None = None,
) -> Any:
    """:func:`load_tokenizer`, checked to fit the model of ``model_name_or_path``."""
    tokenizer = load_tokenizer(tokenizer_name_or_path)
    vocab_size = model_vocab_size(model_name_or_path, config_overrides)
    check_tokenizer_fits(tokenizer, tokenizer_name_or_path, vocab_size, model_name_or_path)
    return tokenizer
