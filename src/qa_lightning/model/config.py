"""The ``model.*`` config: the types and ranges of its optimisation values, the layers a student
keeps, their feed-forward width and the optimizer, checked before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from qa_lightning.core.config import check_types, require, require_above, require_finite


@dataclass
class ModelTypes:
    """The types of ``model.*``'s optimisation values (``conf/model/_base.yaml``)."""

    lr: float = field(metadata={"example": "2e-5"})
    weight_decay: float | None = 0.01
    warmup_ratio: float | None = field(default=0.0, metadata={"example": "0.1"})
    adam_epsilon: float | None = field(default=1e-8, metadata={"example": "1e-8"})


def validate_model_config(model: DictConfig) -> None:
    """The optimisation values of ``model``."""
    check_types(model, ModelTypes, "model.")
    for name, example in (("lr", "2e-5"), ("weight_decay", "0.01"), ("adam_epsilon", "1e-8")):
        require_finite(model, "model.", name, example)
    require_above(model, "model.", "lr", 0, "the learning rate must be > 0 (e.g. 2e-5).")
    require_above(model, "model.", "weight_decay", 0, "must be >= 0.", inclusive=True)
    warmup = model.get("warmup_ratio")
    require(warmup is None or 0 <= warmup < 1, "model.warmup_ratio", warmup, "use [0, 1).")
    require_above(model, "model.", "adam_epsilon", 0, "must be > 0 (e.g. 1e-8).")
    if model.get("keep_layers") is not None:
        from qa_lightning.model.layers import validate_keep_layers

        validate_keep_layers(model)
    if model.get("ffn_width") is not None:
        from qa_lightning.model.width import validate_ffn_width

        validate_ffn_width(model)
    optimizer = model.get("optimizer")
    require(
        isinstance(optimizer, DictConfig) and "_target_" in optimizer,
        "model.optimizer",
        optimizer,
        "choose an optimizer config, e.g. model/optimizer=adamw (conf/model/optimizer/).",
    )
