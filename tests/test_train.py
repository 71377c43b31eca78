"""End-to-end: the real ``train`` CLI on the tiny model and the shipped demo files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qa_lightning.answers.metrics import squad_v1_scores
from qa_lightning.core.config import resource_path
from qa_lightning.data.loading import load_local_file
from qa_lightning.runs.callbacks import flatten
from qa_lightning.train import train
from tests.conftest import TINY_OVERRIDES, run_cli

EPOCHS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("train")
    run_dir, cache = tmp / "run", tmp / "cache"
    overrides = [*TINY_OVERRIDES, f"trainer.max_epochs={EPOCHS}", f"paths.cache_dir={cache}"]
    result = run_cli("qa_lightning.train", *overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, cache, result


def test_run_dir_holds_every_artefact(trained) -> None:
    run_dir, _, _ = trained
    for name in ("config_resolved.yaml", ".hydra/config.yaml", "metrics.json", "predictions.json"):
        assert (run_dir / name).is_file(), name
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("best-") for name in checkpoints)
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert resolved["model"]["config_overrides"]["num_hidden_layers"] == 2


def test_metrics_and_predictions_agree(trained) -> None:
    run_dir, _, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = json.loads((run_dir / "predictions.json").read_text())
    examples = load_local_file(resource_path("demo/validation.json"))
    assert set(predictions) == set(examples["id"])
    references = {
        qid: a["text"] for qid, a in zip(examples["id"], examples["answers"], strict=True)
    }
    rescored = squad_v1_scores(predictions, references)
    # as computed, in float64 (not the float32 of logged values or torchmetrics' tensors)
    assert rescored["f1"] == metrics["best"]["f1"]
    assert rescored["em"] == metrics["best"]["em"]
    assert metrics["best"]["f1"] >= metrics["final"]["f1"]
    assert metrics["epochs"] == EPOCHS
    assert metrics["validation_questions"] == 30
    assert metrics["wall_time_s"] > 0
    for qid, text in predictions.items():
        context = examples[list(examples["id"]).index(qid)]["context"]
        assert text in context


def test_tensorboard_has_curves_once_per_epoch(trained) -> None:
    run_dir, _, _ = trained
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_step", "train/loss_epoch", "val/em", "val/f1", "val/f1_best"} <= tags
    assert any(tag.startswith("train/lr") for tag in tags)  # one curve per parameter group
    # the sanity check ran (Lightning default) but logged no metric of its own
    assert len(events.Scalars("val/f1")) == EPOCHS


def test_hyperparameters_are_logged_once_by_the_summary_callback(trained) -> None:
    """Not also by the module and the data module (``save_hyperparameters``) or the whole config:
    the loggers' hyperparameters are exactly ``callbacks.hparams_summary.params``, flattened."""
    run_dir, _, _ = trained
    logged = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    expected = flatten(resolved["callbacks"]["hparams_summary"]["params"])
    assert logged == expected
    assert {"model.lr", "data.stride", "seed"} <= set(expected)
    # the HPARAMS tab's scores: -1 until training ends, then the best
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    for name in ("f1", "em", "epoch"):
        values = [event.value for event in events.Scalars(f"hp/{name}_best")]
        assert values == [-1, pytest.approx(best[name])]


def test_second_run_reuses_tokenised_windows(trained, tmp_path) -> None:
    _, cache, _ = trained
    before = sorted(p.name for p in cache.iterdir())
    assert len(before) == 2  # train and validation windows
    result = run_cli(
        "qa_lightning.train",
        *TINY_OVERRIDES,
        "trainer.max_epochs=1",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'again'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == before
    log = (tmp_path / "again" / "train.log").read_text()
    assert log.count("loading cached windows") == 2
    assert "windowing" not in result.stderr + result.stdout


def test_fast_dev_run_in_process(compose_train) -> None:
    cfg = compose_train([*TINY_OVERRIDES, "+trainer.fast_dev_run=true"])
    metrics = train(cfg)
    assert 0 <= metrics["final"]["f1"] <= 100
    assert metrics["global_step"] == 1


def test_hub_config_offline_says_how_to_run_locally(tmp_path) -> None:
    result = run_cli(
        "qa_lightning.train",
        "data=sample",
        "model=tiny",
        "trainer=cpu",
        f"paths.cache_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "data=local" in result.stderr and "model=minilm" in result.stderr
    assert "Traceback" not in result.stderr
