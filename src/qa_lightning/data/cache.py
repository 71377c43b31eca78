"""On-disk cache of tokenised windows, keyed by data, tokenizer, max_length and stride."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

log = logging.getLogger(__name__)

#: Bump when the windowing semantics change, so that old caches are not reused.
CACHE_VERSION = 2


def examples_fingerprint(examples: datasets.Dataset) -> str:
    """Hash of the examples' content (ids, questions, contexts and answers, in order)."""
    digest = hashlib.sha256()
    for column in ("id", "question", "context"):
        for value in examples[column][:]:  # [:] decodes the column at once
            digest.update(value.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
    digest.update(json.dumps(examples["answers"][:], sort_keys=True).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary, normalisation and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding hold the settings of the last call, not the tokenizer's identity
        settings = json.loads(backend.to_str())
        settings.pop("truncation", None)
        settings.pop("padding", None)
        state = json.dumps(settings, sort_keys=True)
    else:
        state = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [type(tokenizer).__name__, tokenizer.padding_side, str(tokenizer.all_special_tokens)]
    return hashlib.sha256((state + "|".join(extra)).encode()).hexdigest()


def cache_key(**parts: Any) -> str:
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached(
    cache_dir: str | Path | None, key: str, build: Callable[[], datasets.Dataset]
) -> datasets.Dataset:
    """Load the windows saved under ``key``, or build, save (atomically) and reload them.

    Reloaded windows are memory-mapped Arrow files. With ``cache_dir=None`` nothing is cached.
    """
    if cache_dir is None:
        return build()
    target = Path(cache_dir) / key
    if (target / "dataset_info.json").is_file():
        log.info("loading cached windows from %s", target)
        return datasets.load_from_disk(str(target))
    windows = build()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        windows.save_to_disk(str(staging))
        staging.replace(target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("cached windows in %s", target)
    return datasets.load_from_disk(str(target))
