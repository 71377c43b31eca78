"""Watching a training run: early stopping, the overfit check of ``debug=overfit``, the table of
what the model answers at each validation, and the run's files recorded by the loggers that keep
artefacts (MLflow, W&B). Configured in ``conf/callbacks/`` and ``conf/debug/``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.answers.table import (
    ANSWER_COLUMNS,
    AnswerRow,
    answer_rows,
    answers_table,
    spread_indices,
)
from qa_lightning.core.errors import TrainingError
from qa_lightning.data.collate import MODEL_INPUTS

log = logging.getLogger(__name__)


def early_stopping(patience: int | None = None, **settings: Any) -> EarlyStopping | None:
    """Lightning's :class:`EarlyStopping` that says when it stops the run
    (:class:`LoggedEarlyStopping`; ``settings``: monitor, mode, min_delta ...), or ``None`` (no
    early stopping) while ``patience`` is ``None``."""
    if patience is None:
        return None
    return LoggedEarlyStopping(patience=patience, **settings)


class LoggedEarlyStopping(EarlyStopping):
    """Lightning's :class:`EarlyStopping`, with one log line when it has stopped the run (the
    epoch, the monitored value, its best, the patience) as training ends; ``train`` writes
    :func:`early_stopping_summary` to ``metrics.json``."""

    @property
    def state_key(self) -> str:
        """Lightning's own key, so that a checkpoint of its ``EarlyStopping`` resumes here."""
        return "EarlyStopping" + super().state_key.removeprefix(type(self).__qualname__)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = early_stopping_summary(self, trainer)
        if summary and summary["stopped"] and trainer.is_global_zero:
            log.info("%s", early_stopping_message(self, summary, trainer.max_epochs))


def early_stopping_summary(
    callback: EarlyStopping | None, trainer: L.Trainer
) -> dict[str, Any] | None:
    """What early stopping did, for ``metrics.json``: ``None`` while it is off, else whether it
    stopped the run, at which epoch (counted from 0, as the progress bar counts) and why
    (``patience_exhausted`` ...), the monitored value of the last validation, the best value,
    the patience, ``min_delta`` and the validations since the best (``wait_count``). Any
    :class:`EarlyStopping` (Lightning's own too)."""
    if callback is None:
        return None
    stopped = callback.stopping_reason is not EarlyStoppingReason.NOT_STOPPED
    return {
        "stopped": stopped,
        "epoch": callback.stopped_epoch if stopped else None,
        "reason": callback.stopping_reason.name.lower() if stopped else None,
        "monitor": callback.monitor,
        "value": _finite(trainer.callback_metrics.get(callback.monitor)),
        "best": _finite(callback.best_score),
        "patience": callback.patience,
        "min_delta": abs(callback.min_delta),
        "wait_count": callback.wait_count,
    }


def early_stopping_message(
    callback: EarlyStopping, summary: dict[str, Any], max_epochs: int | None
) -> str:
    """The line saying that (and why) early stopping stopped the run."""
    value, best = (_fmt(summary[key]) for key in ("value", "best"))
    monitor, waited = summary["monitor"], summary["wait_count"]
    patience = f"patience {summary['patience']}"
    if summary["min_delta"]:
        patience += f", min_delta {summary['min_delta']:g}"
    reason = callback.stopping_reason
    if reason is EarlyStoppingReason.PATIENCE_EXHAUSTED:
        why = (
            f"{monitor} {value} did not improve on its best {best} for {waited} "
            f"validation{'s' if waited != 1 else ''} ({patience})"
        )
    elif reason is EarlyStoppingReason.STOPPING_THRESHOLD:
        why = f"{monitor} {value} reached stopping_threshold={callback.stopping_threshold}"
    elif reason is EarlyStoppingReason.DIVERGENCE_THRESHOLD:
        why = f"{monitor} {value} passed divergence_threshold={callback.divergence_threshold}"
    else:
        why = f"{monitor} {value} is not finite"
    if reason is not EarlyStoppingReason.PATIENCE_EXHAUSTED:
        why += f" (best {best}, {patience})"
    epoch = summary["epoch"]
    ran = f"; {epoch + 1} of trainer.max_epochs={max_epochs} epochs ran"
    if not max_epochs or max_epochs < 0:  # no limit
        ran = f"; {epoch + 1} epochs ran"
    return f"early stopping at epoch {epoch}: {why}{ran}"


def _finite(value: Any) -> float | None:
    """A metric as a JSON number: ``None`` when absent or not finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4g}"


class OverfitCheck(Callback):
    """``debug=overfit``: trains on the same ``trainer.overfit_batches`` batches every epoch (the
    training order is otherwise reshuffled each epoch), without dropout unless ``dropout`` (its
    noise on so few windows hides how well they are fit), stops at the end of the first epoch
    whose mean ``train/loss`` is below ``max_loss`` (with ``stop``; else trains every epoch),
    and fails the run unless the last epoch's is below it: a model that cannot fit two batches
    has a bug."""

    def __init__(self, max_loss: float, stop: bool = True, dropout: bool = False) -> None:
        self.max_loss = max_loss
        self.stop = stop
        self.dropout = dropout

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.dropout:
            for module in pl_module.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = getattr(getattr(trainer.train_dataloader, "batch_sampler", None), "sampler", None)
        if trainer.overfit_batches and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(0)  # after Lightning's set_epoch, before the first batch is drawn

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        if self.stop and loss is not None:
            fits = trainer.strategy.reduce_boolean_decision(float(loss) < self.max_loss, all=True)
            trainer.should_stop = trainer.should_stop or fits

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        if loss is None:
            return
        loss = float(loss)
        batches, epochs = trainer.overfit_batches, trainer.current_epoch
        if not loss < self.max_loss:
            raise TrainingError(
                f"the model did not fit {batches} training batches: its mean train/loss after "
                f"{epochs} epochs is {loss:.4f}, not below "
                f"callbacks.overfit_check.max_loss={self.max_loss}. Check the labels and the "
                "loss, raise model.lr or trainer.max_epochs, or lower the bound."
            )
        log.info(
            "overfit check passed: train/loss %.4f < %s on %s batches after %d epochs",
            loss,
            self.max_loss,
            batches,
            epochs,
        )


class _ModuleLogits:
    """The training module's model as the answerer's logits function, in the trainer's
    precision (the same autocast as the validation step)."""

    def __init__(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer, self.pl_module = trainer, pl_module

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.pl_module.device
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        with self.trainer.precision_plugin.val_step_context():
            outputs = self.pl_module.model(**inputs)
        return outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu()


class ValidationAnswers(Callback):
    """After each validation (not the sanity check), answers ``num_questions`` fixed validation
    questions (spread over the set) with the model as it is, and logs the table of gold answer,
    best answer, its probability and F1 as ``val/answers``: markdown to TensorBoard's TEXT tab
    (``add_text``), a table to loggers with ``log_table`` (W&B), a markdown file
    ``answers/step-NNNNNN.md`` to MLflow.

    ``answerer`` makes the question answerer from ``(tokenizer, logits_fn, settings,
    batch_size=, equal_length=)``: ``predict``'s
    :class:`~qa_lightning.serving.answerer.QuestionAnswerer` in ``conf/callbacks/default.yaml``
    (given by the config: this part does not import ``serving``), so the best answer is the one
    validation scored."""

    def __init__(self, answerer: Callable[..., Any], num_questions: int = 10) -> None:
        self.make_answerer = answerer
        self.num_questions = num_questions

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_questions <= 0 or not trainer.loggers:
            return
        examples = getattr(trainer.datamodule, "val_examples", None)
        if examples is None:
            return
        # every rank answers (a sharded model's forward is collective); rank 0 logs
        rows = self.answer(trainer, pl_module, examples)
        if not trainer.is_global_zero:
            return
        title = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        log_answers(trainer.loggers, rows, answers_table(rows, title), trainer.global_step)

    def answer(
        self, trainer: L.Trainer, pl_module: L.LightningModule, examples: Any
    ) -> list[AnswerRow]:
        """The fixed questions answered by the model in its current state."""
        chosen = examples.select(spread_indices(len(examples), self.num_questions))
        data, hp = trainer.datamodule.hparams, pl_module.hparams
        threshold = hp.get("null_score_diff_threshold", 0.0)
        settings = InferenceSettings(
            max_length=data.max_length,
            stride=data.stride,
            max_question_tokens=data.max_question_tokens,
            n_best=hp.n_best,
            max_answer_length=hp.max_answer_length,
            version_2_with_negative=bool(hp.get("version_2_with_negative", False)),
            null_score_diff_threshold=threshold if isinstance(threshold, int | float) else 0.0,
        )
        answerer = self.make_answerer(
            trainer.datamodule.tokenizer,
            _ModuleLogits(trainer, pl_module),
            settings,
            batch_size=data.eval_batch_size,
            equal_length=pl_module.device.type == "cpu",
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            best = answerer.answer(chosen["question"], chosen["context"], top_k=1)
        finally:
            pl_module.train(was_training)
        answers = [(a[0].text, a[0].score) if a else ("", 0.0) for a in best]
        golds = [a["text"] for a in chosen["answers"]]
        return answer_rows(chosen["id"], chosen["question"], golds, answers)


def log_answers(
    loggers: Iterable[Logger], rows: Sequence[AnswerRow], table: str, step: int
) -> None:
    """The answers ``table`` (markdown) and ``rows`` to each logger that takes text or tables."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("val/answers", table, global_step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, table, f"answers/step-{step:06d}.md")
        elif hasattr(logger, "log_table"):
            data = [row.cells() for row in rows]
            logger.log_table(key="val/answers", columns=list(ANSWER_COLUMNS), data=data, step=step)


def log_run_files(loggers: Iterable[Logger], paths: Iterable[Path]) -> None:
    """The run's files (``metrics.json``, ``hf_model/`` ...) recorded as artefacts by the
    loggers that keep them: MLflow (each under its name) and W&B (one ``run_files``
    artefact, then the W&B run is finished: its offline files are complete)."""
    paths = [Path(p) for p in paths if p and Path(p).exists()]
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            for path in paths:
                if path.is_dir():
                    logger.experiment.log_artifacts(logger.run_id, str(path), path.name)
                else:
                    logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(f"run-{logger.experiment.id}", type="run_files")
            for path in paths:
                if path.is_dir():
                    artifact.add_dir(str(path), name=path.name)
                else:
                    artifact.add_file(str(path))
            logger.experiment.log_artifact(artifact)
            logger.experiment.finish()
