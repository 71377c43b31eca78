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

from qa_lightning.cli import report_errors
from qa_lightning.config import register_resolvers, validate_train_config
from qa_lightning.export import try_export_hf

log = logging.getLogger(__name__)
register_resolvers()


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path`` if given, else with ``resume=true`` the run dir's last checkpoint."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("resume") and last.is_file():
        return str(last)
    return None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then write ``metrics.json``, ``predictions.json`` and the resolved config to the run
    dir. Returns the metrics written."""
    validate_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # data errors surface before the model is loaded
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    # our own checkpoints hold OmegaConf hyperparameters and RNG states: not weights_only-loadable
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg), weights_only=False)
    wall_time = time.perf_counter() - start

    final = {k: float(trainer.callback_metrics[f"val/{k}"]) for k in ("em", "f1")}
    metrics = {
        "final": final,
        "best": model.best,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "wall_time_s": round(wall_time, 1),
        "train_questions": cfg.data.train_samples,
        "train_windows": len(datamodule.train_windows),
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


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best ``val/f1``, the value a Hydra sweeper optimises."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # raise, not exit: Hydra records the job as failed and the sweep goes on
        return train(cfg)["best"]["f1"]
    return report_errors(lambda: train(cfg))["best"]["f1"]


if __name__ == "__main__":
    main()
