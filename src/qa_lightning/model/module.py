"""LightningModule wrapping ``AutoModelForQuestionAnswering``; SQuAD EM/F1 every epoch."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from transformers import AutoConfig, AutoModelForQuestionAnswering, get_scheduler

from qa_lightning.errors import ConfigError
from qa_lightning.metrics import squad_v1_scores, squad_v2_scores
from qa_lightning.postprocess import best_window_spans, example_answers, window_rows
from qa_lightning.tokenizer import OFFLINE_HINT

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
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


def load_qa_model(
    name_or_path: str, from_scratch: bool = False, config_overrides: dict | None = None
) -> torch.nn.Module:
    """A pretrained QA model, or with ``from_scratch`` a randomly initialised one whose config is
    ``name_or_path``'s updated with ``config_overrides`` (e.g. a 2-layer model for tests).

    Weights are fp32 whatever the checkpoint stores (transformers 5 keeps a fp16/bf16 checkpoint's
    dtype): mixed precision trains fp32 master weights, and 16-mixed's grad scaler rejects fp16.
    """
    try:
        if from_scratch:
            config = AutoConfig.from_pretrained(name_or_path, **(config_overrides or {}))
            return AutoModelForQuestionAnswering.from_config(config)
        return AutoModelForQuestionAnswering.from_pretrained(
            name_or_path, **(config_overrides or {})
        ).float()
    except Exception as error:  # hub, file and config errors come in many types
        text = str(error).strip().splitlines()
        raise ConfigError(
            f"could not load model '{name_or_path}' ({type(error).__name__}: "
            f"{text[0] if text else ''}). Check model.name_or_path"
            + (" and model.config_overrides" if config_overrides else "")
            + f". {OFFLINE_HINT}"
        ) from error


class QAModule(L.LightningModule):
    """Fine-tunes an extractive QA model; every validation epoch scores EM/F1 on all questions.

    Validation windows are reduced to their best span in ``validation_step``; at the end of the
    epoch the spans of all windows (gathered over ranks) are reduced to one answer per question.
    """

    def __init__(
        self,
        name_or_path: str,
        from_scratch: bool = False,
        config_overrides: dict[str, Any] | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        adam_epsilon: float = 1e-8,
        scheduler: str = "linear",
        warmup_ratio: float = 0.0,
        fused_optimizer: bool | None = None,
        compile: bool = False,
        n_best: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: bool = False,
        null_score_diff_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        config_overrides = _plain(config_overrides)  # saved as a plain dict in checkpoints
        self.save_hyperparameters()
        self.model = self.load_model(name_or_path, from_scratch, config_overrides)
        # from_pretrained returns eval mode and Lightning keeps submodule modes: train with dropout
        self.model.train()
        if compile:
            self.model.forward = torch.compile(self.model.forward)
        self.best: dict[str, float] = {"f1": -1.0, "em": -1.0, "epoch": -1}
        self.best_predictions: dict[str, str] = {}
        self.last_predictions: dict[str, str] = {}
        self.last_scores: dict[str, float] = {}
        self._val_spans: list[torch.Tensor] = []

    def load_model(
        self, name_or_path: str, from_scratch: bool, config_overrides: dict[str, Any] | None
    ) -> torch.nn.Module:
        """The QA model this module runs (a subclass may run another kind, e.g. ONNX)."""
        return load_qa_model(name_or_path, from_scratch, config_overrides)

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs = {k: batch[k] for k in (*MODEL_INPUTS, "start_positions", "end_positions")}
        loss = self.model(**{k: v for k, v in inputs.items() if k in batch}).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}. Likely "
                "causes: fp16 overflow (use trainer.precision=bf16-mixed or 32), a learning rate "
                "too high (model.lr), or corrupted inputs."
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

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
            threshold = self.hparams.null_score_diff_threshold
            predictions = answers.predictions(threshold)
            v2 = squad_v2_scores(answers.answers, answers.null_diffs, references, threshold)
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
        hp = self.hparams
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                (no_decay if any(n in name for n in NO_DECAY) else decay).append(parameter)
        fused = hp.fused_optimizer
        if fused is None:  # fused kernels exist for both; on CPU the step is ~6x faster
            fused = self.device.type in FUSED_ADAMW_DEVICES
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            eps=hp.adam_epsilon,
            fused=fused,
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            hp.scheduler,
            optimizer,
            num_warmup_steps=int(hp.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qa_best"] = {"scores": self.best, "predictions": self.best_predictions}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("qa_best")
        if saved:
            self.best, self.best_predictions = saved["scores"], saved["predictions"]


def _plain(overrides: Any) -> dict[str, Any] | None:
    """Hydra passes DictConfig; transformers wants a plain dict."""
    if overrides is None:
        return None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(overrides, resolve=True)  # type: ignore[return-value]
    except ValueError:
        return dict(overrides)
