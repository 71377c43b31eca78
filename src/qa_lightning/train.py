"""Fine-tune and evaluate: ``python -m qa_lightning.train [overrides]`` (``conf/train.yaml``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qa_lightning.cli import explain_out_of_memory, report_errors
from qa_lightning.config import register_resolvers, validate_max_length, validate_train_config
from qa_lightning.errors import ConfigError, TrainingError
from qa_lightning.export import read_checkpoint, try_export_hf
from qa_lightning.hardware import cpu_bf16_warning
from qa_lightning.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
register_resolvers()


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path`` if given, else with ``resume=true`` the run dir's last checkpoint; checked
    to be readable before any work."""
    if cfg.get("ckpt_path"):
        path, key = Path(cfg.ckpt_path), "ckpt_path"
    else:
        path, key = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", "resume=true"
        if not (cfg.get("resume") and path.is_file()):
            return None
    if path.is_dir():  # a sharded (DeepSpeed, FSDP) checkpoint: its strategy reads it
        return str(path)
    try:
        read_checkpoint(path)  # memory-mapped: reads the header, not the weights
    except ConfigError as error:
        raise ConfigError(
            f"{error} Cannot continue from it ({key}); give another checkpoint with "
            "ckpt_path=PATH (e.g. the run's checkpoints/best-*.ckpt), or start afresh in a new "
            "run dir."
        ) from error
    return str(path)


def fit(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: Any,
    cfg: DictConfig,
    ckpt_path: str | None = None,
) -> None:
    """``trainer.fit``; a non-finite loss or running out of memory becomes a :class:`QAError`
    naming the settings to change and the checkpoint kept."""
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    data, trainer_cfg = cfg.data, cfg.trainer
    memory_settings = {
        "data.batch_size": data.batch_size,
        "data.eval_batch_size": data.eval_batch_size,
        "data.max_length": data.max_length,
        "trainer.precision": trainer_cfg.get("precision"),
        "trainer.accumulate_grad_batches": trainer_cfg.get("accumulate_grad_batches", 1),
    }
    with explain_out_of_memory(
        "training",
        memory_settings,
        "halve data.batch_size and double trainer.accumulate_grad_batches (the same "
        "effective batch), lower data.eval_batch_size if it failed in validation, use "
        "trainer.precision=bf16-mixed on a GPU, or lower data.max_length.",
        lambda: (
            f"Progress so far is in '{last}': continue with resume=true "
            f"hydra.run.dir={cfg.paths.output_dir}."
            if last.is_file()
            else ""
        ),
    ):
        try:
            # our own checkpoints hold OmegaConf hyperparameters and RNG states: not
            # weights_only-loadable
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        except FloatingPointError as error:
            raise diverged_error(error, cfg, last) from error


def diverged_error(error: FloatingPointError, cfg: DictConfig, last: Path) -> TrainingError:
    """A non-finite loss, explained: the settings to change and whether a checkpoint is kept."""
    kept = (
        f"'{last}' was saved before the loss diverged and is kept."
        if last.is_file()
        else "No checkpoint of the diverged weights was written."
    )
    precision = str(cfg.trainer.get("precision"))
    fixes = ["lower model.lr"]
    if not cfg.trainer.get("gradient_clip_val"):  # turned off: the default clips at norm 1.0
        fixes.append("clip gradients (trainer.gradient_clip_val=1.0, the default)")
    if "16" in precision and "bf16" not in precision:
        fixes.append("train in trainer.precision=bf16-mixed (or 32-true)")
    return TrainingError(
        f"training stopped: {error} The run used model.lr={cfg.model.lr}, "
        f"trainer.precision={precision} and "
        f"trainer.gradient_clip_val={cfg.trainer.get('gradient_clip_val')}: "
        f"{', '.join(fixes[:-1]) + ' or ' if len(fixes) > 1 else ''}{fixes[-1]}, and start "
        f"again. {kept}"
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then write ``metrics.json``, ``predictions.json`` and the resolved config to the run
    dir. Returns the metrics written."""
    validate_train_config(cfg)
    ckpt_path = resume_checkpoint(cfg)  # an unreadable checkpoint fails before any work
    validate_max_length(cfg.data.max_length, load_tokenizer(cfg.data.tokenizer_name_or_path))
    if warning := cpu_bf16_warning(str(cfg.trainer.accelerator), str(cfg.trainer.precision)):
        log.warning(warning)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # trainer first: its config errors (precision, accelerator ...) surface before any work
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    datamodule = instantiate(cfg.data)
    if trainer.local_rank == 0:  # tokenised once per machine; data errors before the model loads
        datamodule.prepare_data("fit")
    model = instantiate(cfg.model)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    fit(trainer, model, datamodule, cfg, ckpt_path)
    wall_time = time.perf_counter() - start

    metrics = {
        "final": {k: model.last_scores.get(k) for k in ("em", "f1")},
        "best": model.best,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "wall_time_s": round(wall_time, 1),
        "train_questions": datamodule.num_train_examples,
        "train_windows": len(datamodule.train_windows),
        "train_tokens_per_window": model.train_tokens_per_window,
        "validation_questions": len(datamodule.val_examples),
        "skipped_records": {split: len(ids) for split, ids in datamodule.skipped.items()},
        "best_checkpoint": trainer.checkpoint_callback.best_model_path
        if trainer.checkpoint_callback
        else None,
    }
    if metrics["best_checkpoint"] and trainer.is_global_zero:
        metrics["hf_model"] = try_export_hf(metrics["best_checkpoint"], output_dir / "hf_model")
    if not trainer.is_global_zero:  # DDP: rank 0 writes the run's files
        return metrics
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "predictions.json").write_text(
        json.dumps(model.best_predictions, indent=1, ensure_ascii=False)
    )
    log.info(
        "best val/f1 %.2f (em %.2f) at epoch %d",
        model.best["f1"],
        model.best["em"],
        model.best["epoch"],
    )
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best ``val/f1``, the value a Hydra sweeper optimises."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # raise, not exit: Hydra records the job as failed and the sweep goes on
        return train(cfg)["best"]["f1"]
    return report_errors(lambda: train(cfg))["best"]["f1"]


if __name__ == "__main__":
    main()
