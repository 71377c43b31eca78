"""Fine-tune and evaluate: ``python -m qa_lightning.train [overrides]`` (``conf/train.yaml``)."""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qa_lightning.cli import (
    explain_out_of_memory,
    hydra_main,
    quiet_output,
    report_errors,
    write_results,
)
from qa_lightning.core.config import register_resolvers, validate_max_length
from qa_lightning.core.errors import ConfigError, TrainingError
from qa_lightning.core.hardware import cpu_bf16_warning
from qa_lightning.core.integrity import disk_full_error, write_atomic, writing
from qa_lightning.core.tokenizer import load_model_tokenizer
from qa_lightning.runs.checkpoint_reading import (
    check_resumable,
    load_checkpoint_file,
    trust_setting,
)
from qa_lightning.runs.config import validate_train_config
from qa_lightning.runs.monitoring import early_stopping_summary, log_run_files
from qa_lightning.runs.teacher import attach_teacher_logits, check_teacher
from qa_lightning.runs.tuning import find_lr
from qa_lightning.serving.exports import try_export_hf

log = logging.getLogger(__name__)
register_resolvers()


def resume_checkpoint(cfg: DictConfig) -> tuple[str | None, bool]:
    """``ckpt_path`` if given, else with ``resume=true`` the run dir's last checkpoint; checked
    to be intact and safe to load (see
    :func:`~qa_lightning.runs.checkpoint_reading.load_checkpoint_file`) before any work. Returns
    it and the ``weights_only`` to load it with."""
    trust = trust_setting(cfg)
    if cfg.get("ckpt_path"):
        path, key = Path(cfg.ckpt_path), "ckpt_path"
    else:
        path, key = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", "resume=true"
        if not (cfg.get("resume") and path.is_file()):
            if cfg.get("resume"):  # killed before its first checkpoint, or a new run
                log.info("resume=true: no %s yet; the run starts from the beginning", path)
            return None, True
    if path.is_dir():  # a sharded (DeepSpeed, FSDP) checkpoint: its strategy reads it
        return str(path), not trust
    try:
        checkpoint, weights_only = load_checkpoint_file(path, trust)  # memory-mapped
    except ConfigError as error:
        raise ConfigError(
            f"{error} Cannot continue from it ({key}); give another last.ckpt with "
            "ckpt_path=PATH, start afresh in a new run dir, or from the weights of the run's "
            "best checkpoint (checkpoints/best-*.ckpt, exported to hf_model/): "
            "model.name_or_path=<run dir>/hf_model model.from_scratch=false."
        ) from error
    check_resumable(checkpoint, path, key)
    return str(path), weights_only


def remove_partial_files(output_dir: Path) -> None:
    """Remove the ``*.part`` files (checkpoints, ``metrics.json`` ...) that a run killed while
    writing them left in its run dir."""
    for partial_file in [*output_dir.glob("*.part"), *(output_dir / "checkpoints").glob("*.part")]:
        log.info("removing %s, left by an interrupted write", partial_file)
        partial_file.unlink(missing_ok=True)


def fit(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: Any,
    cfg: DictConfig,
    ckpt_path: str | None = None,
    weights_only: bool = True,
) -> None:
    """``trainer.fit``; a non-finite loss, running out of memory or a full disk (checkpoints,
    TensorBoard events) becomes a :class:`QAError` naming the settings to change and the
    checkpoint kept."""
    output_dir = Path(cfg.paths.output_dir)
    last = output_dir / "checkpoints" / "last.ckpt"

    def kept() -> str:
        if last.is_file():
            return f"'{last}' is kept: continue with resume=true hydra.run.dir={output_dir}"
        return "no checkpoint was written yet"

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
            f"Progress so far is in '{last}': continue with resume=true hydra.run.dir={output_dir}."
            if last.is_file()
            else ""
        ),
    ):
        try:
            # checkpoints report a full disk themselves (AtomicCheckpointIO); this is the rest:
            # logs such as TensorBoard events, whose writer thread fails at the next write
            with writing(output_dir, "the run's logs (TensorBoard events ...)", kept=kept):
                trainer.fit(
                    model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only
                )
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
    if not cfg.trainer.get("gradient_clip_val"):
        fixes.append("clip gradients (trainer.gradient_clip_val=1.0)")
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
    # an unreadable or unsafe checkpoint, or a tokenizer that does not fit, fails before any work
    ckpt_path, weights_only = resume_checkpoint(cfg)
    tokenizer = load_model_tokenizer(
        cfg.data.tokenizer_name_or_path, cfg.model.name_or_path, cfg.model.get("config_overrides")
    )
    validate_max_length(cfg.data.max_length, tokenizer)
    if cfg.get("distill"):  # the teacher exists and shares the student's tokenizer
        check_teacher(cfg.distill, tokenizer, cfg.data.max_length)
    if warning := cpu_bf16_warning(str(cfg.trainer.accelerator), str(cfg.trainer.precision)):
        log.warning(warning)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if ckpt_path:
        remove_partial_files(output_dir)
    write = partial(
        write_atomic,
        on_disk_full=partial(
            disk_full_error,
            advice=f"then finish the run with resume=true hydra.run.dir={output_dir}.",
        ),
    )
    write(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # trainer first: its config errors (precision, accelerator ...) surface before any work
    # every entry of callbacks and logger (logger=[tensorboard,mlflow]: several); an entry that
    # instantiates to None is off (callbacks.early_stopping while its patience is null)
    callbacks = [c for c in map(instantiate, (cfg.get("callbacks") or {}).values()) if c]
    loggers = [c for c in map(instantiate, (cfg.get("logger") or {}).values()) if c]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    datamodule = instantiate(cfg.data)
    if trainer.local_rank == 0:  # tokenised once per machine; data errors before the model loads
        datamodule.prepare_data("fit")
    if cfg.get("distill"):  # the teacher's logits of every training window, once (cached)
        datamodule.setup("fit")  # the other ranks: the windows rank 0 cached
        attach_teacher_logits(datamodule, cfg.distill, trainer.strategy.root_device)
    # hyperparameters reach the loggers once, from callbacks.hparams_summary
    # (the run dir's config_resolved.yaml holds the whole config)
    model = instantiate(cfg.model)
    tuned = None
    if cfg.get("tune") and not ckpt_path:  # a resumed run keeps its learning rate
        tuned = find_lr(trainer, model, datamodule, cfg.tune, output_dir)

    start = time.perf_counter()
    fit(trainer, model, datamodule, cfg, ckpt_path, weights_only)
    wall_time = time.perf_counter() - start

    metrics = {
        "final": {k: model.last_scores.get(k) for k in ("em", "f1")},
        "best": model.best,
        "epochs": trainer.current_epoch,
        # null while early stopping is off; else whether (and at which epoch, why) it stopped
        "early_stopping": early_stopping_summary(trainer.early_stopping_callback, trainer),
        "global_step": trainer.global_step,
        "wall_time_s": round(wall_time, 1),
        "train_questions": datamodule.num_train_examples,
        "train_windows": len(datamodule.train_windows),
        "train_tokens_per_window": model.train_tokens_per_window,
        "validation_questions": len(datamodule.val_examples),
        "skipped_records": {split: len(ids) for split, ids in datamodule.skipped.items()},
        **({"tune": tuned} if tuned else {}),
        "best_checkpoint": trainer.checkpoint_callback.best_model_path
        if trainer.checkpoint_callback
        else None,
    }
    if metrics["best_checkpoint"] and trainer.is_global_zero:
        metrics["hf_model"] = try_export_hf(
            metrics["best_checkpoint"], output_dir / "hf_model", trust_setting(cfg)
        )
    if not trainer.is_global_zero:  # DDP: rank 0 writes the run's files
        return metrics
    write_results(output_dir, model.best_predictions, metrics, write)
    run_files = ["metrics.json", "predictions.json"]
    log_run_files(trainer.loggers, [*(output_dir / f for f in run_files), metrics.get("hf_model")])
    log.info(
        "best val/f1 %.2f (em %.2f) at epoch %d; run dir %s",
        model.best["f1"],
        model.best["em"],
        model.best["epoch"],
        output_dir,
    )
    if metrics.get("hf_model"):
        log.info(
            "answer questions with it: python -m qa_lightning.predict model_dir=%s input=- "
            '(jsonl lines {"question": ..., "context": ...} on standard input)',
            metrics["hf_model"],
        )
    return metrics


@hydra_main("train")
def main(cfg: DictConfig) -> float:
    """Returns the best ``val/f1``, the value a Hydra sweeper optimises."""
    quiet_output(cfg)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # raise, not exit: Hydra records the job as failed and the sweep goes on
        return train(cfg)["best"]["f1"]
    return report_errors(lambda: train(cfg))["best"]["f1"]


if __name__ == "__main__":
    main()
