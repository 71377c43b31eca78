"""A training run's config checked as a whole before data are tokenised or a model is loaded: its
required values, each part's section and ``trainer.*``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from qa_lightning.answers.config import validate_decoding_config
from qa_lightning.core.config import check_types, require_above, require_finite
from qa_lightning.core.errors import ConfigError
from qa_lightning.core.hardware import missing_gpu_error
from qa_lightning.data.config import validate_data_config
from qa_lightning.model.config import validate_model_config


@dataclass
class TrainerTypes:
    """The types of the ``trainer.*`` keys that the project checks (the rest are Lightning's)."""

    max_epochs: int | None = field(default=None, metadata={"example": "3"})
    accumulate_grad_batches: int | None = field(default=None, metadata={"example": "2"})
    gradient_clip_val: float | None = field(default=None, metadata={"example": "1.0"})


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
    if error := missing_gpu_error(str(trainer.get("accelerator"))):
        raise ConfigError(error)
    require_finite(trainer, "trainer.", "gradient_clip_val", "1.0")
    require_above(trainer, "trainer.", "max_epochs", 0, "must be > 0.")
    require_above(
        trainer, "trainer.", "accumulate_grad_batches", 0, "must be > 0 (1: no accumulation)."
    )
    require_above(
        trainer,
        "trainer.",
        "gradient_clip_val",
        0,
        "must be >= 0 (1.0: the reference recipe's max gradient norm), or null for no clipping.",
        inclusive=True,
    )
