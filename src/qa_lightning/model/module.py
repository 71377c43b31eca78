"""LightningModule wrapping ``AutoModelForQuestionAnswering``; SQuAD EM/F1 every epoch."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from transformers import get_scheduler

from qa_lightning.answers.metrics import squad_v1_scores, squad_v2_scores
from qa_lightning.answers.postprocess import best_window_spans, example_answers, window_rows
from qa_lightning.core.plain import plain
from qa_lightning.data.collate import MODEL_INPUTS
from qa_lightning.model.distillation import batch_distillation_loss, mixed_loss
from qa_lightning.model.files import CHECKPOINT_KEY as MODEL_FILES_KEY
from qa_lightning.model.files import model_files
from qa_lightning.model.loading import load_qa_model

log = logging.getLogger(__name__)

V2_LOGGED = (
    "HasAns_f1",
    "NoAns_f1",
    "best_f1",
    "best_f1_thresh",
    "best_exact",
    "best_exact_thresh",
)
#: Devices with a fused AdamW kernel (one pass over all parameters, no per-tensor dispatch).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "norm.weight")


class QAModule(L.LightningModule):
    """Fine-tunes an extractive QA model; every validation epoch scores EM/F1 on all questions.

    Validation windows are reduced to their best span in ``validation_step``; at the end of the
    epoch the spans of all windows (gathered over ranks) are reduced to one answer per question.

    A non-finite training loss is recorded on the device, without waiting for it, and raised as
    a ``FloatingPointError`` naming its step at the next check: every
    ``trainer.log_every_n_steps`` batches (when the logged loss is read anyway), before every
    checkpoint is written (so that none holds diverged weights), before validation and at the
    end of training.
    """

    def __init__(
        self,
        name_or_path: str,
        from_scratch: bool = False,
        config_overrides: dict[str, Any] | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        adam_epsilon: float = 1e-8,
        scheduler: str | Callable[..., Any] | None = "linear",
        warmup_ratio: float = 0.0,
        fused_optimizer: bool | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        compile: bool = False,
        n_best: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: bool = False,
        null_score_diff_threshold: float | str = 0.0,
        keep_layers: list[int] | None = None,
        distill: dict[str, Any] | None = None,
        ffn_width: int | None = None,
    ) -> None:
        super().__init__()
        config_overrides = plain(config_overrides)  # saved as a plain dict in checkpoints
        keep_layers = None if keep_layers is None else list(keep_layers)
        distill = plain(distill)  # teacher, temperature, alpha (conf/distill/); None: no teacher
        # the factories stay out of checkpoints (they would pickle Hydra's wrapper classes); the
        # run dir's config_resolved.yaml records them. Loggers get the hyperparameters once, from
        # callbacks.hparams_summary
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.model = self.load_model(
            name_or_path, from_scratch, config_overrides, keep_layers, ffn_width
        )
        # from_pretrained returns eval mode and Lightning keeps submodule modes: train with dropout
        self.model.train()
        if compile:
            self.model.forward = torch.compile(self.model.forward)
        self.best: dict[str, float] = {"f1": -1.0, "em": -1.0, "epoch": -1}
        self.best_predictions: dict[str, str] = {}
        self.last_predictions: dict[str, str] = {}
        self.last_scores: dict[str, float] = {}
        self._val_spans: list[torch.Tensor] = []
        self._model_files: dict[str, Any] | None = None
        #: mean padded tokens per training window over the run, all ranks (set when fit ends)
        self.train_tokens_per_window: float | None = None
        # this process's padded tokens and windows trained on (rank 0's include the ranks'
        # totals up to the checkpoint it resumed from)
        self._train_tokens = 0
        self._train_windows = 0
        # step and loss of the first non-finite training loss, on the device (-1: none)
        self._non_finite_step: torch.Tensor | None = None
        self._non_finite_loss: torch.Tensor | None = None

    def load_model(
        self,
        name_or_path: str,
        from_scratch: bool,
        config_overrides: dict[str, Any] | None,
        keep_layers: list[int] | None = None,
        ffn_width: int | None = None,
    ) -> torch.nn.Module:
        """The QA model this module runs (a subclass may run another kind, e.g. ONNX)."""
        return load_qa_model(
            name_or_path, from_scratch, config_overrides, keep_layers, ffn_width=ffn_width
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self._record_non_finite(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's cross-entropy on the labels; with ``distill``, mixed with the teacher's
        soft targets (:func:`~qa_lightning.model.distillation.mixed_loss`), both parts logged."""
        inputs = {k: batch[k] for k in (*MODEL_INPUTS, "start_positions", "end_positions")}
        outputs = self.model(**{k: v for k, v in inputs.items() if k in batch})
        if not self.hparams.distill:
            return outputs.loss
        distill_loss = batch_distillation_loss(outputs, batch, self.hparams.distill["temperature"])
        self.log("train/loss_distill", distill_loss, on_step=True, on_epoch=True)
        self.log("train/loss_label", outputs.loss, on_step=True, on_epoch=True)
        return mixed_loss(outputs.loss, distill_loss, self.hparams.distill["alpha"])

    # -- non-finite loss, padding --------------------------------------------------------------

    def _record_non_finite(self, loss: torch.Tensor) -> None:
        """Keeps the step and value of the first non-finite loss, on the loss's device: no sync."""
        loss = loss.detach().float()
        if self._non_finite_step is None:
            self._non_finite_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._non_finite_loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._non_finite_step < 0)
        self._non_finite_step = torch.where(first, self.global_step, self._non_finite_step)
        self._non_finite_loss = torch.where(first, loss, self._non_finite_loss)

    def _raise_if_non_finite(self) -> None:
        """Raises ``FloatingPointError`` if a rank saw a non-finite loss (a host sync; a collective
        under DDP: every rank calls it at the same point)."""
        if self._non_finite_step is None:
            return
        steps = self.all_gather(self._non_finite_step).reshape(-1).tolist()
        losses = self.all_gather(self._non_finite_loss).reshape(-1).tolist()
        found = [(step, loss) for step, loss in zip(steps, losses, strict=True) if step >= 0]
        if not found:
            return
        step, loss = min(found)
        raise FloatingPointError(
            f"non-finite training loss ({loss}) at step {step}. Likely causes: fp16 overflow "
            "(use trainer.precision=bf16-mixed or 32), a learning rate too high (model.lr), or "
            "corrupted inputs."
        )

    def _padding_totals(self) -> tuple[int, int]:
        """Padded tokens and windows trained on so far, summed over the ranks (a collective)."""
        counts = torch.tensor([self._train_tokens, self._train_windows], device=self.device)
        tokens, windows = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        return int(tokens), int(windows)

    def on_train_start(self) -> None:
        self._non_finite_step = self._non_finite_loss = None

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # counted before a checkpoint at this batch's end holds the totals
        windows, tokens = batch["input_ids"].shape  # known on the host: no sync
        self._train_windows += windows
        self._train_tokens += windows * tokens

    def on_train_batch_end(
        self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        # checkpoints saved at this batch (callbacks' hooks run first) were checked on saving
        if (batch_idx + 1) % self.trainer.log_every_n_steps == 0:
            self._raise_if_non_finite()

    def on_train_end(self) -> None:
        self._raise_if_non_finite()
        tokens, windows = self._padding_totals()
        self.train_tokens_per_window = round(tokens / windows, 2) if windows else None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        outputs = self(batch)
        spans = best_window_spans(
            outputs.start_logits,
            outputs.end_logits,
            batch["offset_mapping"],
            self.hparams.n_best,
            self.hparams.max_answer_length,
        )
        self._val_spans.append(window_rows(batch["example_index"], spans))

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self._raise_if_non_finite()  # no time spent scoring diverged weights
        self._val_spans.clear()

    def on_validation_epoch_end(self) -> None:
        local = torch.cat(self._val_spans) if self._val_spans else torch.zeros(0, 5)
        self._val_spans.clear()
        spans = self._gather_rows(local.to(self.device)).cpu().numpy()
        if self.trainer.sanity_checking:
            return  # a few batches are not the validation set: no metrics from them
        datamodule = self.trainer.datamodule
        examples = datamodule.val_examples
        ids = examples["id"][:]  # [:] decodes whole columns (row by row is ~30x slower)
        answers = example_answers(spans, ids, examples["context"][:])
        references = {qid: a["text"] for qid, a in zip(ids, examples["answers"][:], strict=True)}
        if self.hparams.version_2_with_negative:
            threshold = self.hparams.null_score_diff_threshold  # a number, or "best"
            v2 = squad_v2_scores(answers.answers, answers.null_diffs, references, threshold)
            predictions = answers.predictions(v2["null_score_diff_threshold"])
            scores = {"em": v2["exact"], "f1": v2["f1"], **v2}
        else:
            predictions = answers.predictions()
            scores = squad_v1_scores(predictions, references)
        self.last_predictions, self.last_scores = predictions, scores
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if fitting and scores["f1"] > self.best["f1"]:
            self.best = {**scores, "epoch": self.current_epoch}
            self.best_predictions = predictions
        self.log("val/em", scores["em"], prog_bar=True)
        self.log("val/f1", scores["f1"], prog_bar=True)
        for key in V2_LOGGED:
            if key in scores:
                self.log(f"val/{key}", scores[key])
        if self.best["epoch"] >= 0:
            self.log("val/f1_best", self.best["f1"])

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """All ranks' rows, concatenated (ranks may hold different numbers of rows)."""
        if self.trainer.world_size == 1:
            return rows
        sizes = self.all_gather(torch.tensor(len(rows), device=rows.device))
        padded = torch.full((int(sizes.max()), rows.shape[1]), float("nan"), device=rows.device)
        padded[: len(rows)] = rows
        gathered = self.all_gather(padded).reshape(-1, rows.shape[1])
        return gathered[~torch.isnan(gathered[:, 0])]

    def configure_optimizers(self) -> dict[str, Any]:
        """``optimizer`` (``conf/model/optimizer/``) over two parameter groups, ``weight_decay``
        and none on biases and LayerNorm weights, with ``lr``, and ``eps`` (``adam_epsilon``) and
        ``fused`` where it takes them and its config does not set them; ``fused_optimizer=None``
        means fused where the device has a kernel. ``scheduler`` (``conf/model/scheduler/``: a
        factory called with ``optimizer, num_warmup_steps, num_training_steps`` like
        transformers' schedules, or a name for ``transformers.get_scheduler``; ``None``: constant
        ``lr``) steps every optimizer step, ``warmup_ratio`` of them warming up."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                (no_decay if any(n in name for n in NO_DECAY) else decay).append(parameter)
        fused = hp.fused_optimizer
        if fused is None:  # fused kernels exist for both; on CPU the step is ~6x faster
            fused = self.device.type in FUSED_ADAMW_DEVICES
        settings = _unset_arguments(self.make_optimizer, lr=hp.lr, eps=hp.adam_epsilon, fused=fused)
        optimizer = self.make_optimizer(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            **settings,
        )
        make_scheduler = self.make_scheduler
        if make_scheduler is None:
            return {"optimizer": optimizer}
        if isinstance(make_scheduler, str):
            make_scheduler = partial(get_scheduler, make_scheduler)
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = make_scheduler(
            optimizer=optimizer,
            num_warmup_steps=int(hp.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does, also for fused AdamW under mixed precision.

        Lightning refuses to clip an optimizer that unscales gradients inside its step (fused
        AdamW) under ``bf16-mixed``/``16-mixed``. bf16 has no grad scaler, so the gradients are
        the true ones; with ``16-mixed`` they are unscaled here first (the scaler's step then
        knows they are, and skips the step on non-finite ones as usual).
        """
        if not gradient_clip_val or not getattr(optimizer, "_step_supports_amp_scaling", False):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Besides the best scores: the last validation's scores and predictions (a run resumed
        from its end writes the same metrics.json; its ``best_f1_thresh`` is what
        ``null_score_diff_threshold=best`` exports), the model's config and tokenizer files (so
        that the checkpoint rebuilds its model without ``name_or_path``) and the padding counts.
        Only tensors and plain values, so that the checkpoint loads with ``weights_only=True``."""
        # called on every rank before any is written: diverged weights are never saved
        self._raise_if_non_finite()
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(checkpoint[key])
        for key in ("hparams_type", "datamodule_hparams_type"):  # a class: not loadable safely
            checkpoint.pop(key, None)
        checkpoint["qa_best"] = plain({"scores": self.best, "predictions": self.best_predictions})
        checkpoint["qa_last"] = plain(
            {"scores": self.last_scores, "predictions": self.last_predictions}
        )
        if self._model_files is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self._model_files = model_files(
                self.model.config, getattr(datamodule, "tokenizer", None)
            )
        checkpoint[MODEL_FILES_KEY] = self._model_files
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            tokens, windows = self._padding_totals()
            checkpoint["qa_train_padding"] = {"tokens": tokens, "windows": windows}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("qa_best")
        if saved:
            self.best, self.best_predictions = saved["scores"], saved["predictions"]
        last = checkpoint.get("qa_last")
        if last:
            self.last_scores, self.last_predictions = last["scores"], last["predictions"]
        padding = checkpoint.get("qa_train_padding")
        if padding and self.global_rank == 0:  # the ranks' totals, counted once
            self._train_tokens, self._train_windows = padding["tokens"], padding["windows"]


def _unset_arguments(factory: Callable[..., Any], **arguments: Any) -> dict[str, Any]:
    """The ``arguments`` that ``factory`` takes and does not fix already (as a ``partial`` from
    config does): ``eps`` for AdamW but not SGD, nothing that its config sets."""
    taken = inspect.signature(factory).parameters
    fixed = factory.keywords if isinstance(factory, partial) else {}
    return {k: v for k, v in arguments.items() if k in taken and k not in fixed}
