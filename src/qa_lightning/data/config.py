"""The ``data.*`` config: its types, the windowing rule
(:func:`~qa_lightning.data.windowing.windowing_problem`) and the files, checked before any heavy
work.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from qa_lightning.core.config import check_types, require, require_above
from qa_lightning.core.errors import ConfigError, invalid_config
from qa_lightning.data.records import OnBadRecord
from qa_lightning.data.windowing import windowing_problem

# -- types: structured schemas that OmegaConf checks ----------------------------------------


@dataclass
class DataTypes:
    """The types of ``data.*`` sizes and switches (``conf/data/``); the other keys are the data
    module's arguments, checked where they are used."""

    max_length: int = field(metadata={"example": "384"})
    stride: int = field(metadata={"example": "128"})
    max_question_tokens: int = field(metadata={"example": "64"})
    batch_size: int = field(metadata={"example": "8"})
    eval_batch_size: int = field(metadata={"example": "32"})
    train_samples: int | None = field(default=None, metadata={"example": "2000"})
    validation_samples: int | None = field(default=None, metadata={"example": "1000"})
    num_workers: int | None = field(default=0, metadata={"example": "2"})
    pad_to_multiple_of: int | None = 8
    group_by_length: bool = True
    pad_to_max_length: bool = False
    eval_equal_length: bool | None = field(
        default=None,
        metadata={"fix": "must be true or false, or null (true on CPU, false on GPU)."},
    )


def validate_data_config(data: DictConfig) -> None:
    """Types and ranges of ``data``'s sizes, windowing that the tokenizer can do, and files."""
    check_types(data, DataTypes, "data.")
    if problem := windowing_problem(
        data.max_length, data.stride, data.max_question_tokens, "data."
    ):
        raise invalid_config(problem)
    for name in ("batch_size", "eval_batch_size"):
        require_above(data, "data.", name, 0, "must be > 0.")
    for name in ("train_samples", "validation_samples"):
        require_above(data, "data.", name, 0, "must be > 0, or null for all.")
    require_above(data, "data.", "num_workers", 0, "must be >= 0.", inclusive=True)
    require_above(data, "data.", "pad_to_multiple_of", 0, "must be > 0 (e.g. 8), or null.")
    require(
        data.on_bad_record in typing.get_args(OnBadRecord),
        "data.on_bad_record",
        data.on_bad_record,
        "use error (stop and list bad records) or skip (skip and count them).",
    )
    for key in ("train_file", "validation_file"):
        path = data.get(key)
        if not path and not data.get("dataset_name"):
            raise ConfigError(
                f"no data for data.{key.removesuffix('_file')}: set data.{key}=PATH (SQuAD json, "
                "jsonl or parquet), or data.dataset_name=squad to load it from the hub."
            )
        if path and not Path(path).exists():
            raise ConfigError(
                f"data.{key}='{path}' does not exist (resolved to '{Path(path).resolve()}'); "
                "relative paths are relative to the directory you run from."
            )
        if path and not Path(path).is_file():
            raise ConfigError(
                f"data.{key}='{path}' is a directory, not a file; give the SQuAD json, jsonl "
                "or parquet file in it."
            )
