"""Early stopping says so: one log line when it stops a run, and the stop in metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn

from qa_lightning.runs.monitoring import (
    LoggedEarlyStopping,
    early_stopping,
    early_stopping_summary,
)
from tests.conftest import train_tiny


def fake_trainer(max_epochs: int = 6) -> SimpleNamespace:
    """What EarlyStopping reads of a trainer: the monitored value, the epoch, the stop flag."""
    return SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        sanity_checking=False,
        fast_dev_run=False,
        callback_metrics={},
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        should_stop=False,
        current_epoch=0,
        is_global_zero=True,
        max_epochs=max_epochs,
        val_check_interval=1.0,  # a validation at each epoch end: the check runs there
        check_val_every_n_epoch=1,
    )


def drive(callback: EarlyStopping, scores: list[float]) -> SimpleNamespace:
    """Validate ``scores`` one epoch each, as Lightning's fit loop would, until told to stop."""
    trainer = fake_trainer()
    callback.setup(trainer, None, "fit")
    for epoch, score in enumerate(scores):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/f1": torch.tensor(score)}
        callback.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            break
    callback.on_train_end(trainer, None)
    return trainer


@pytest.mark.parametrize(
    ("scores", "settings", "expected", "line"),
    [
        # best 20 at epoch 1; 15 and 18 are two validations without a rise: patience 2 stops at 3
        (
            [10.0, 20.0, 15.0, 18.0, 30.0],
            {"patience": 2},
            {"epoch": 3, "value": 18.0, "best": 20.0, "wait_count": 2},
            "early stopping at epoch 3: val/f1 18 did not improve on its best 20 for 2 "
            "validations (patience 2); 4 of trainer.max_epochs=6 epochs ran",
        ),
        # a rise of less than min_delta=1 is none: 10.5 and 10.8 do not beat 10
        (
            [10.0, 10.5, 10.8, 12.0],
            {"patience": 2, "min_delta": 1.0},
            {"epoch": 2, "value": 10.8, "best": 10.0, "wait_count": 2},
            "early stopping at epoch 2: val/f1 10.8 did not improve on its best 10 for 2 "
            "validations (patience 2, min_delta 1); 3 of trainer.max_epochs=6 epochs ran",
        ),
        # patience 1: the first validation without a rise stops
        (
            [10.0, 9.0, 30.0],
            {"patience": 1},
            {"epoch": 1, "value": 9.0, "best": 10.0, "wait_count": 1},
            "early stopping at epoch 1: val/f1 9 did not improve on its best 10 for 1 "
            "validation (patience 1); 2 of trainer.max_epochs=6 epochs ran",
        ),
    ],
)
def test_early_stopping_logs_one_line_and_summarises_the_stop(
    caplog, scores, settings, expected, line
) -> None:
    callback = early_stopping(monitor="val/f1", mode="max", **settings)
    assert isinstance(callback, LoggedEarlyStopping)
    with caplog.at_level(logging.INFO, logger="qa_lightning.runs.monitoring"):
        trainer = drive(callback, scores)
    assert trainer.current_epoch == expected["epoch"]  # Lightning's own decision
    assert [r.getMessage() for r in caplog.records] == [line]
    summary = early_stopping_summary(callback, trainer)
    assert summary == {
        "stopped": True,
        "reason": "patience_exhausted",
        "monitor": "val/f1",
        "patience": settings["patience"],
        "min_delta": settings.get("min_delta", 0.0),
        **{key: pytest.approx(value) for key, value in expected.items()},
    }


def test_early_stopping_that_does_not_fire_logs_nothing(caplog) -> None:
    callback = early_stopping(monitor="val/f1", mode="max", patience=2)
    with caplog.at_level(logging.INFO, logger="qa_lightning.runs.monitoring"):
        trainer = drive(callback, [10.0, 20.0, 15.0, 25.0])
    assert not trainer.should_stop
    assert caplog.records == []
    assert early_stopping_summary(callback, trainer) == {
        "stopped": False,
        "epoch": None,
        "reason": None,
        "monitor": "val/f1",
        "value": 25.0,
        "best": 25.0,
        "patience": 2,
        "min_delta": 0.0,
        "wait_count": 0,
    }


def test_non_finite_metric_stop_is_said_with_its_reason(caplog) -> None:
    callback = early_stopping(monitor="val/f1", mode="max", patience=3)
    with caplog.at_level(logging.INFO, logger="qa_lightning.runs.monitoring"):
        trainer = drive(callback, [10.0, float("nan"), 20.0])
    assert trainer.current_epoch == 1
    assert [r.getMessage() for r in caplog.records] == [
        "early stopping at epoch 1: val/f1 nan is not finite (best 10, patience 3); "
        "2 of trainer.max_epochs=6 epochs ran"
    ]
    summary = early_stopping_summary(callback, trainer)
    assert (summary["reason"], summary["value"], summary["best"]) == ("non_finite_metric", None, 10)


def test_early_stopping_off_is_none_in_metrics() -> None:
    assert early_stopping(patience=None, monitor="val/f1") is None
    assert early_stopping_summary(None, fake_trainer()) is None


def test_train_stopped_early_says_so_in_its_log_and_metrics(tmp_path: Path) -> None:
    """The tiny model for up to 4 epochs; min_delta=1000 makes every validation after the first
    one without improvement, so patience 1 stops after epoch 1 (2 epochs run)."""
    metrics = train_tiny(
        tmp_path,
        "trainer.max_epochs=4",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=1000",
    )
    assert metrics["epochs"] == 2
    stop = metrics["early_stopping"]
    assert stop["value"] == pytest.approx(metrics["final"]["f1"], abs=1e-4)  # epoch 1's f1
    assert {k: v for k, v in stop.items() if k not in ("value", "best")} == {
        "stopped": True,
        "epoch": 1,
        "reason": "patience_exhausted",
        "monitor": "val/f1",
        "patience": 1,
        "min_delta": 1000,
        "wait_count": 1,
    }
    log = (metrics["run_dir"] / "train.log").read_text()
    lines = [line for line in log.splitlines() if "early stopping at epoch" in line]
    assert len(lines) == 1
    assert lines[0].endswith(
        f"early stopping at epoch 1: val/f1 {stop['value']:.4g} did not improve on its best "
        f"{stop['best']:.4g} for 1 validation (patience 1, min_delta 1000); 2 of "
        "trainer.max_epochs=4 epochs ran"
    )


def test_its_state_key_is_lightnings_so_earlier_checkpoints_resume_it() -> None:
    logged = early_stopping(patience=2, monitor="val/f1", mode="max")
    assert logged.state_key == EarlyStopping(monitor="val/f1", mode="max").state_key
