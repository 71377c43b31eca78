"""``tune=lr_find``: Lightning's learning-rate finder on the composed run, before training."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

from qa_lightning.runs.callbacks import HyperparametersSummary

log = logging.getLogger(__name__)

#: The plot of loss against learning rate, in the run dir.
PLOT_FILE = "lr_find.png"
#: The finder's steps when ``tune.num_training`` is null: one epoch of the training data, but at
#: least MIN_STEPS (the suggestion skips the first 10 points) and at most MAX_STEPS.
MIN_STEPS, MAX_STEPS = 20, 100


def finder_steps(num_training: int | None, epoch_steps: int) -> int:
    """The finder's steps: ``num_training`` if given, else one epoch of ``epoch_steps`` within
    [:data:`MIN_STEPS`, :data:`MAX_STEPS`]."""
    if num_training is not None:
        return int(num_training)
    return min(MAX_STEPS, max(MIN_STEPS, epoch_steps))


def epoch_steps(trainer: L.Trainer, datamodule: L.LightningDataModule) -> int:
    """The optimizer steps of one training epoch on each rank, as the trainer will run them
    (``limit_train_batches``, ``overfit_batches`` and ``accumulate_grad_batches`` applied)."""
    datamodule.setup("fit")
    batches = math.ceil(len(datamodule.train_dataloader()) / trainer.world_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None:
        batches = int(batches * limit)
    return max(1, batches // trainer.accumulate_grad_batches)


def find_lr(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    tune: DictConfig,
    output_dir: Path,
) -> dict[str, Any]:
    """Run ``Tuner(trainer).lr_find`` (it restores the weights and the trainer afterwards), save
    its plot to ``output_dir``/:data:`PLOT_FILE`, log the suggestion as ``tune/lr_suggestion``
    and, with ``tune.apply``, train with it (``model.hparams.lr``, and the hyperparameters the
    loggers get). Returns what ``metrics.json`` records: the suggestion, the learning rate the run
    trains with, the finder's steps and the plot's path."""
    configured = float(model.hparams.lr)
    per_epoch = epoch_steps(trainer, datamodule)
    steps = finder_steps(tune.get("num_training"), per_epoch)
    why = (
        f"tune.num_training={steps}"
        if tune.get("num_training") is not None
        else f"one epoch is {per_epoch}; tune.num_training=null: an epoch, at least {MIN_STEPS}, "
        f"at most {MAX_STEPS}"
    )
    then = "its suggestion" if tune.apply else f"model.lr={configured:g} (tune.apply=false)"
    log.info(
        "lr_find: %d training steps (%s), the learning rate rising %s from %g to %g, then the "
        "weights restored; the run then trains with %s",
        steps,
        why,
        "exponentially" if tune.mode == "exponential" else "linearly",
        tune.min_lr,
        tune.max_lr,
        then,
    )
    # The finder's fit would stop at max_epochs (short epochs of a small data set) before its
    # num_training steps, validate at each epoch end, and finalize the run's loggers when it ends
    # (TensorBoard's hparams.yaml written empty, the MLflow run marked finished): it runs with
    # enough epochs (one step each at least; it replaces the schedule), no validation, no loggers.
    loop, every, loggers = trainer.fit_loop, trainer.check_val_every_n_epoch, trainer.loggers
    max_epochs = loop.max_epochs
    trainer.loggers = []
    loop.max_epochs = max(max_epochs or 1, steps)
    trainer.check_val_every_n_epoch = 2**31 - 1
    try:
        finder = Tuner(trainer).lr_find(
            model,
            datamodule=datamodule,
            min_lr=tune.min_lr,
            max_lr=tune.max_lr,
            num_training=steps,
            mode=tune.mode,
            early_stop_threshold=tune.early_stop_threshold,
            update_attr=False,
        )
    finally:
        loop.max_epochs, trainer.check_val_every_n_epoch = max_epochs, every
        trainer.loggers = loggers
    suggestion = finder.suggestion() if finder is not None else None
    result: dict[str, Any] = {
        "lr_suggestion": suggestion,
        "lr": configured,
        "steps": steps,
        "plot": None,
    }
    if suggestion is None:
        log.warning(
            "lr_find found no suggestion (too few steps before the loss diverged); training "
            "with model.lr=%s. Raise tune.num_training or lower tune.max_lr.",
            configured,
        )
        return result
    result["plot"] = save_plot(finder, output_dir / PLOT_FILE)
    for logger in trainer.loggers:
        logger.log_metrics({"tune/lr_suggestion": suggestion}, step=0)
    if tune.apply:
        model.hparams.lr = suggestion
        result["lr"] = suggestion
        for callback in trainer.callbacks:
            if isinstance(callback, HyperparametersSummary) and "model.lr" in callback.params:
                callback.params["model.lr"] = suggestion
    log.info(
        "lr_find suggests model.lr=%.3g; training with %.3g%s",
        suggestion,
        result["lr"],
        "" if tune.apply else " (tune.apply=false)",
    )
    return result


def save_plot(finder: Any, path: Path) -> str | None:
    """The finder's loss-against-learning-rate plot with its suggestion, as a PNG (``None``
    without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return None
    figure = finder.plot(suggest=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)
