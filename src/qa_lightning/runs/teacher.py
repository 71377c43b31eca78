"""The teacher of task distillation (``distill=``), run once over the training windows.

    python -m qa_lightning.train model=minilm model.keep_layers=[0,2,4] distill=default \\
        distill.teacher=outputs/train/TEACHER/hf_model data=local ...

The teacher runs once, in eval mode, over the training windows; its logits are cached beside the
windows, keyed by the windows' content and the teacher's weights, so that every epoch (and every
later student trained on the same windows) reads them instead of running the teacher. The loss
they enter is :mod:`qa_lightning.model.distillation`'s.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from qa_lightning.core.config import check_types, validate_max_length
from qa_lightning.core.errors import ConfigError
from qa_lightning.core.tokenizer import load_tokenizer
from qa_lightning.data import cache
from qa_lightning.data.collate import MODEL_INPUTS, TEACHER_LOGITS, WindowCollator
from qa_lightning.data.sampling import sorted_batches
from qa_lightning.model.logits import AUTOCAST_DTYPES, TorchLogits, resolve_precision
from qa_lightning.runs.checkpoint_reading import (
    Exported,
    checkpoint_model_config,
    load_checkpoint,
    load_model_dir,
    read_checkpoint,
)

log = logging.getLogger(__name__)

#: Files of an exported model directory that define its logits (architecture and weights).
WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin")


# -- the config --------------------------------------------------------------------------------


@dataclass
class DistillTypes:
    """The types of ``distill.*`` (``conf/distill/``); the teacher and precision are checked by
    :func:`validate_distill_config`."""

    temperature: float = field(metadata={"example": "2.0"})
    alpha: float = field(metadata={"example": "0.5"})
    batch_size: int = field(metadata={"example": "32"})


def validate_distill_config(distill: Any) -> None:
    """``distill.temperature > 0``, ``0 <= distill.alpha <= 1``, ``distill.batch_size > 0``, a
    known ``distill.precision`` and a teacher that exists (an exported model directory or a
    ``.ckpt`` file)."""
    check_types(distill, DistillTypes, "distill.")
    temperature, alpha = distill.temperature, distill.alpha
    if not math.isfinite(temperature) or not temperature > 0:
        raise ConfigError(
            f"invalid config: distill.temperature={temperature!r}; must be a number > 0 "
            "(e.g. 2.0; 1 leaves the teacher's distributions as they are, higher softens them)."
        )
    if not 0 <= alpha <= 1:
        raise ConfigError(
            f"invalid config: distill.alpha={alpha!r}; must be in [0, 1], the weight of the "
            "teacher's soft targets against the labels (e.g. 0.5; 0: labels only, 1: teacher only)."
        )
    if distill.batch_size <= 0:
        raise ConfigError(
            f"invalid config: distill.batch_size={distill.batch_size!r}; must be an integer > 0, "
            "the windows per teacher forward pass (e.g. 32)."
        )
    precision = distill.get("precision", "auto")
    if precision != "auto" and precision not in AUTOCAST_DTYPES:
        raise ConfigError(
            f"invalid config: distill.precision={precision!r}; use auto, "
            f"{', '.join(AUTOCAST_DTYPES)}."
        )
    teacher_kind(distill.get("teacher"))


def teacher_kind(teacher: Any) -> str:
    """``"model_dir"`` or ``"checkpoint"``, or a :class:`ConfigError` saying what to give."""
    if not teacher:
        raise ConfigError(
            "distill.teacher is not set: give a fine-tuned model, either a training run's "
            "exported directory (distill.teacher=outputs/train/RUN/hf_model) or one of its "
            "checkpoints (distill.teacher=outputs/train/RUN/checkpoints/best-....ckpt)."
        )
    path = Path(str(teacher))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"distill.teacher='{path}' is a directory without config.json, not an exported "
                "model; give a training run's hf_model/ directory or a .ckpt file."
            )
        return "model_dir"
    if path.is_file():
        return "checkpoint"
    raise ConfigError(
        f"distill.teacher='{path}' does not exist (resolved to '{path.resolve()}'); give a "
        "training run's hf_model/ directory or one of its checkpoints/*.ckpt."
    )


def teacher_tokenizer(teacher: str | Path) -> Any:
    """The teacher's tokenizer, without loading its weights."""
    if teacher_kind(teacher) == "model_dir":
        return load_tokenizer(str(teacher))
    checkpoint = read_checkpoint(teacher)  # memory-mapped: the weights are not read
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    name = (
        data.get("tokenizer_name_or_path")
        or checkpoint_model_config(checkpoint, teacher)["name_or_path"]
    )
    return load_tokenizer(str(name))


def check_teacher(distill: Any, student_tokenizer: Any, max_length: int) -> None:
    """The teacher exists, shares the student's tokenizer (the soft targets are per token: both
    models must see the same tokens) and takes windows of ``max_length`` tokens."""
    validate_distill_config(distill)
    tokenizer = teacher_tokenizer(distill.teacher)
    if cache.tokenizer_fingerprint(tokenizer) != cache.tokenizer_fingerprint(student_tokenizer):
        raise ConfigError(
            f"the teacher distill.teacher='{distill.teacher}' has another tokenizer "
            f"({type(tokenizer).__name__}, {len(tokenizer)} tokens) than the student "
            f"({type(student_tokenizer).__name__}, {len(student_tokenizer)} tokens, from "
            "data.tokenizer_name_or_path): the teacher's logits are per token, so both must "
            "tokenise alike. Distil into a student of the teacher's family (e.g. "
            "model.name_or_path=<the teacher's base model> model.keep_layers=[0,2,4])."
        )
    validate_max_length(max_length, tokenizer)


def load_teacher(teacher: str | Path) -> Exported:
    """The teacher model (eval mode) with its tokenizer."""
    if teacher_kind(teacher) == "model_dir":
        return load_model_dir(teacher)
    return load_checkpoint(teacher)


# -- the teacher's logits, once ----------------------------------------------------------------


def teacher_fingerprint(teacher: str | Path) -> str:
    """Hash of the teacher's files that define its logits: a checkpoint file, or a model
    directory's config and weight files."""
    path = Path(teacher)
    files = (
        sorted(f for pattern in WEIGHT_FILES for f in path.glob(pattern))
        if path.is_dir()
        else [path]
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def windows_fingerprint(windows: datasets.Dataset) -> str:
    """Hash of the model inputs of ``windows`` (token ids, masks, token types, in order)."""
    table = windows.with_format("arrow")[:]  # respects a selection or a reordering
    digest = hashlib.sha256(str(len(windows)).encode())
    for name in MODEL_INPUTS:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        digest.update(name.encode())
        digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
        digest.update(column.flatten().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


def compute_teacher_logits(
    logits_fn: Any,
    windows: datasets.Dataset,
    pad_token_id: int,
    batch_size: int = 32,
    equal_length: bool = True,
) -> dict[str, list[np.ndarray]]:
    """The teacher's start/end logits of every window, in window order, each cut to its window's
    length (``len(input_ids)``), as float32 arrays. Runs ``logits_fn`` (e.g. a
    :class:`~qa_lightning.model.logits.TorchLogits`: eval mode, no gradients) once per window, in
    batches of similar length (``equal_length``: of one length, unpadded), with a progress bar."""
    inputs = windows.select_columns([k for k in MODEL_INPUTS if k in windows.column_names])
    lengths = [len(ids) for ids in inputs["input_ids"]]
    collator = WindowCollator(pad_token_id, None if equal_length else 8)
    logits: dict[str, list[Any]] = {key: [None] * len(lengths) for key in TEACHER_LOGITS}
    with tqdm(total=len(lengths), unit="window", desc="teacher logits") as bar:
        for rows in sorted_batches(lengths, batch_size, equal_length):
            rows = [int(i) for i in rows]
            start, end = logits_fn(collator([inputs[i] for i in rows]))
            for j, i in enumerate(rows):
                logits["teacher_start_logits"][i] = start[j, : lengths[i]].numpy()
                logits["teacher_end_logits"][i] = end[j, : lengths[i]].numpy()
            bar.update(len(rows))
    return logits


def add_teacher_logits(
    windows: datasets.Dataset,
    teacher: str | Path,
    pad_token_id: int,
    cache_dir: str | Path | None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
) -> datasets.Dataset:
    """``windows`` with the columns ``teacher_start_logits`` and ``teacher_end_logits``: from the
    cache when this teacher has seen these windows before, else computed once and cached."""
    device = torch.device(device)
    precision = resolve_precision(precision, str(device))
    key = cache.cache_key(
        kind="teacher_logits",
        windows=windows_fingerprint(windows),
        teacher=teacher_fingerprint(teacher),
        precision=precision,
    )

    teacher_ran: list[bool] = []

    def build() -> datasets.Dataset:
        teacher_ran.append(True)
        exported = load_teacher(teacher)
        logits_fn = TorchLogits(exported.model, str(device), precision)
        start = time.perf_counter()
        logits = compute_teacher_logits(
            logits_fn, windows, pad_token_id, batch_size, equal_length=device.type == "cpu"
        )
        log.info(
            "teacher logits of %d windows computed in %.1f s on %s in %s (once: every epoch "
            "reads them from the cache)",
            len(windows),
            time.perf_counter() - start,
            device,
            precision,
        )
        features = datasets.Features(
            {name: datasets.Sequence(datasets.Value("float32")) for name in TEACHER_LOGITS}
        )
        return datasets.Dataset.from_dict(logits, features=features)

    logits = cache.cached(cache_dir, key, build, "the teacher logits cache entry")
    if not teacher_ran:
        log.info(
            "teacher logits of %d windows read from the cache: the teacher did not run",
            len(windows),
        )
    return datasets.concatenate_datasets([windows, logits], axis=1)


def attach_teacher_logits(datamodule: Any, distill: Any, device: str | torch.device) -> None:
    """Give the (set-up) datamodule's training windows the teacher's logits (see
    :func:`add_teacher_logits`); its train loader then batches them with the windows."""
    hp = datamodule.hparams
    datamodule.train_windows = add_teacher_logits(
        datamodule.train_windows,
        distill.teacher,
        datamodule.tokenizer.pad_token_id,
        hp.cache_dir,
        device,
        distill.get("precision", "auto"),
        distill.batch_size,
    )
