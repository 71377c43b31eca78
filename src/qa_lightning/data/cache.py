"""On-disk cache of tokenised windows, keyed by data, tokenizer, max_length and stride."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from qa_lightning.core.integrity import (
    file_manifest,
    manifest_problems,
    staged_directory,
    writing,
)

log = logging.getLogger(__name__)

#: Bump when the windowing semantics change, so that old caches are not reused.
CACHE_VERSION = 2
#: Sizes and SHA-256 digests of an entry's files, written last into the entry.
MANIFEST = "qa_lightning_manifest.json"


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
    cache_dir: str | Path | None,
    key: str,
    build: Callable[[], datasets.Dataset],
    what: str = "the window cache entry",
) -> datasets.Dataset:
    """Load the windows saved under ``key``, or build, save (atomically) and reload them.

    Reloaded windows are memory-mapped Arrow files, checked against the manifest written with
    them; a damaged entry (a file cut short or altered, no manifest, or one that does not load)
    is never used: it is rebuilt, with a warning naming it. With ``cache_dir=None`` nothing is
    cached. A full disk while saving is a :class:`~qa_lightning.errors.ResourceError` naming the
    entry (``what``) and the free space; nothing of the entry is left.
    """
    if cache_dir is None:
        return build()
    target = Path(cache_dir) / key
    if target.exists():
        problem = entry_problem(target)
        if problem is None:
            try:
                windows = datasets.load_from_disk(str(target))
                log.info("loading cached windows from %s", target)
                return windows
            except Exception as error:  # Arrow, JSON and file errors come in many types
                problem = f"it does not load ({type(error).__name__}: {_first_line(error)})"
        log.warning("the window cache entry '%s' is damaged (%s); rebuilding it", target, problem)
        discard(target)
    windows = build()
    advice = (
        "or set paths.cache_dir=DIR to a disk with room (paths.cache_dir=null: no cache, the "
        "data is tokenised again by every run)."
    )
    with writing(target, what, advice), staged_directory(target, replace=False) as staging:
        windows.save_to_disk(str(staging))
        (staging / MANIFEST).write_text(json.dumps(file_manifest(staging), indent=1))
    log.info("cached windows in %s", target)
    return datasets.load_from_disk(str(target))


def entry_problem(entry: Path) -> str | None:
    """Why the cache entry ``entry`` cannot be used, or ``None`` when its files are as written."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}: written by an older version, or incompletely"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"unreadable {MANIFEST} ({type(error).__name__})"
    problems = manifest_problems(entry, manifest)
    return "; ".join(problems) if problems else None


def discard(entry: Path) -> None:
    """Remove a damaged cache entry: renamed away first, so that no process loads it meanwhile."""
    doomed = entry.with_name(f".{entry.name}.damaged-{os.getpid()}")
    try:
        entry.rename(doomed)
    except OSError:
        doomed = entry
    shutil.rmtree(doomed, ignore_errors=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
