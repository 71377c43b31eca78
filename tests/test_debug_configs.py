"""``debug=`` configs composed with an experiment, and ``tune=lr_find``, on the tiny model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qa_lightning.core.errors import TrainingError
from qa_lightning.runs.monitoring import OverfitCheck
from qa_lightning.runs.tuning import MAX_STEPS, MIN_STEPS, epoch_steps, finder_steps
from qa_lightning.train import train
from tests.conftest import TINY_OVERRIDES

#: The tiny model's overrides, with the experiment and the debug config choosing the epochs.
TINY = [o for o in TINY_OVERRIDES if not o.startswith("trainer.max_epochs")]


def debug_run(compose_train, debug: str, *overrides: str):
    """``experiment=demo debug=<debug>`` with the tiny model; the composed config."""
    cfg = compose_train(["experiment=demo", f"debug={debug}", *TINY, *overrides])
    assert cfg.model.from_scratch and cfg.task_name == "debug"
    return cfg


def test_fdr_runs_one_batch_of_each_and_writes_metrics(compose_train) -> None:
    cfg = debug_run(compose_train, "fdr")
    assert cfg.trainer.fast_dev_run is True
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert metrics["global_step"] == 1
    assert metrics["best_checkpoint"] in (None, "")  # fast_dev_run saves no checkpoint
    assert not (run_dir / "checkpoints").exists()  # last.ckpt neither
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
    assert not (run_dir / "tensorboard").exists()  # nor logs


def test_limits_train_a_few_batches_and_export(compose_train) -> None:
    cfg = debug_run(compose_train, "limits")
    metrics = train(cfg)
    assert metrics["epochs"] == 2
    assert metrics["global_step"] == 2 * cfg.trainer.limit_train_batches == 8
    assert (Path(cfg.paths.output_dir) / "hf_model" / "config.json").is_file()


def test_profiler_writes_its_report_to_the_run_dir(compose_train) -> None:
    cfg = debug_run(compose_train, "profiler")
    train(cfg)
    reports = list((Path(cfg.paths.output_dir) / "profiler").glob("*report*.txt"))
    assert reports, "no profiler report"
    text = "\n".join(r.read_text() for r in reports)
    assert "run_training_epoch" in text and "SingleDeviceStrategy.training_step" in text


def epoch_losses(run_dir: Path) -> list[float]:
    """Each epoch's mean train/loss, as TensorBoard got it."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss_epoch")]


def assert_stopped_at_the_first_fit(metrics: dict, losses: list[float], cfg) -> None:
    """The run fit its batches and stopped at the end of the first epoch below the bound."""
    max_loss = cfg.callbacks.overfit_check.max_loss
    assert losses[0] > 4  # it started unfit (log 128 = 4.85)
    assert losses[-1] < max_loss <= min(losses[:-1])
    assert metrics["epochs"] == len(losses) < cfg.trainer.max_epochs
    assert metrics["global_step"] == 2 * len(losses)
    run_dir = Path(cfg.paths.output_dir)
    assert metrics["best_checkpoint"] is None and not list(run_dir.rglob("*.ckpt"))  # no use


def test_overfit_fits_the_same_batches(compose_train) -> None:
    cfg = debug_run(
        compose_train,
        "overfit",
        "trainer.max_epochs=10",
        "model.lr=1e-2",  # the random tiny model needs more than a pretrained encoder's 3e-4
        "callbacks.overfit_check.max_loss=1.5",  # it plateaus near 0.27 (at 1e-2, no dropout)
    )
    assert cfg.trainer.overfit_batches == 2 and cfg.model.scheduler is None
    metrics = train(cfg)  # raises TrainingError unless the loss ends below max_loss
    assert_stopped_at_the_first_fit(metrics, epoch_losses(Path(cfg.paths.output_dir)), cfg)


@pytest.mark.slow  # the demo model: about a minute on 2 cores
@pytest.mark.parametrize("trainer", ["cpu", "cpu_bf16"])
def test_overfit_fits_the_demo_model_decisively(compose_train, trainer) -> None:
    """``experiment=demo debug=overfit`` as the docs give it, in fp32 and bf16: the demo model
    fits its two batches with a third of the epochs allowed to spare (13 of 30 here)."""
    cfg = compose_train(["experiment=demo", "debug=overfit", f"trainer={trainer}"])
    assert cfg.trainer.precision == {"cpu": "32-true", "cpu_bf16": "bf16-mixed"}[trainer]
    metrics = train(cfg)
    losses = epoch_losses(Path(cfg.paths.output_dir))
    assert_stopped_at_the_first_fit(metrics, losses, cfg)
    assert len(losses) <= cfg.trainer.max_epochs * 2 // 3


def fake_trainer(loss: float, **fields) -> SimpleNamespace:
    """What :class:`OverfitCheck` reads of a trainer, one process."""
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    return SimpleNamespace(
        callback_metrics={"train/loss_epoch": torch.tensor(loss)},
        strategy=strategy,
        should_stop=False,
        **fields,
    )


def test_overfit_check_stops_at_the_first_epoch_below_the_bound() -> None:
    check, trainer = OverfitCheck(max_loss=0.5), fake_trainer(0.75)
    check.on_train_epoch_end(trainer, None)
    assert not trainer.should_stop
    trainer.callback_metrics["train/loss_epoch"] = torch.tensor(0.25)
    check.on_train_epoch_end(trainer, None)
    assert trainer.should_stop
    trainer.should_stop = False
    OverfitCheck(max_loss=0.5, stop=False).on_train_epoch_end(trainer, None)
    assert not trainer.should_stop  # trains every epoch


@pytest.mark.parametrize("dropout", [False, True])
def test_overfit_check_turns_dropout_off_unless_asked(dropout) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    OverfitCheck(max_loss=0.5, dropout=dropout).on_fit_start(None, model)
    assert model[1].p == (0.1 if dropout else 0.0)


def test_overfit_check_fails_a_loss_above_the_bound() -> None:
    check = OverfitCheck(max_loss=0.5)
    trainer = fake_trainer(0.75, overfit_batches=2, current_epoch=30)
    with pytest.raises(
        TrainingError, match=r"did not fit 2 training batches.*0\.7500.*max_loss=0\.5"
    ):
        check.on_train_end(trainer, None)
    trainer.callback_metrics["train/loss_epoch"] = torch.tensor(0.25)
    check.on_train_end(trainer, None)  # passes


def test_lr_find_suggests_applies_and_plots(compose_train, caplog) -> None:
    pytest.importorskip("matplotlib")
    cfg = compose_train([*TINY_OVERRIDES, "tune=lr_find"])
    assert cfg.tune.num_training is None  # sized to the data
    with caplog.at_level(logging.INFO, logger="qa_lightning.runs.tuning"):
        metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    tuned = metrics["tune"]
    # an epoch is 5 steps: the finder runs its least, said before it starts
    assert tuned["steps"] == MIN_STEPS == 20
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lr_find: ")]
    assert said[0].startswith("lr_find: 20 training steps (one epoch is 5; tune.num_training")
    assert "from 1e-07 to 1, then the weights restored" in said[0]
    assert cfg.tune.min_lr < tuned["lr_suggestion"] < cfg.tune.max_lr
    assert tuned["lr"] == tuned["lr_suggestion"] != cfg.model.lr
    assert Path(tuned["plot"]) == run_dir / "lr_find.png"
    assert (run_dir / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    # the training ran with it: the logged learning rate and hyperparameters
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert events.Scalars("tune/lr_suggestion")[0].value == pytest.approx(tuned["lr"], rel=1e-6)
    assert events.Scalars("train/lr/pg1")[0].value == pytest.approx(tuned["lr"], rel=1e-6)
    logged = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert logged["model.lr"] == pytest.approx(tuned["lr"])
    # the finder's steps are not the run's: a fresh start, the module's best from training only
    assert metrics["global_step"] == 5 and metrics["best"]["epoch"] == 0


def test_lr_find_without_apply_keeps_the_configured_lr(compose_train) -> None:
    cfg = compose_train(
        [*TINY_OVERRIDES, "tune=lr_find", "tune.num_training=12", "tune.apply=false"]
    )
    metrics = train(cfg)
    assert metrics["tune"]["lr"] == cfg.model.lr
    assert metrics["tune"]["steps"] == 12  # as given
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    assert events.Scalars("train/lr/pg1")[0].value == pytest.approx(cfg.model.lr)


@pytest.mark.parametrize(
    ("num_training", "epoch", "steps"),
    [(None, 5, MIN_STEPS), (None, 60, 60), (None, 2_700, MAX_STEPS), (7, 2_700, 7)],
)
def test_finder_steps_are_an_epoch_within_bounds_unless_given(num_training, epoch, steps) -> None:
    assert finder_steps(num_training, epoch) == steps


@pytest.mark.parametrize(
    ("limit", "accumulate", "steps"),
    [(1.0, 1, 6), (1.0, 2, 3), (0.5, 1, 3), (4, 1, 4), (4, 3, 1)],
)
def test_epoch_steps_are_the_optimizer_steps_of_one_rank(limit, accumulate, steps) -> None:
    """11 batches over 2 ranks: 6 on each, then the trainer's limit and accumulation."""
    datamodule = SimpleNamespace(setup=lambda stage: None, train_dataloader=lambda: range(11))
    trainer = SimpleNamespace(
        world_size=2, limit_train_batches=limit, accumulate_grad_batches=accumulate
    )
    assert epoch_steps(trainer, datamodule) == steps
