"""Loggers (TensorBoard, CSV, MLflow, W&B; several at once), early stopping, the answers table of
each validation and the callbacks options, on runs of the tiny model on the demo files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, RichModelSummary, RichProgressBar
from omegaconf import DictConfig, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qa_lightning.answers.metrics import squad_v1_scores
from qa_lightning.answers.table import (
    ANSWER_COLUMNS,
    AnswerRow,
    answer_rows,
    answers_table,
    spread_indices,
)
from qa_lightning.data.loading import load_local_file
from qa_lightning.runs.callbacks import flatten
from qa_lightning.runs.monitoring import early_stopping
from qa_lightning.train import train
from tests.conftest import CONF_DIR, ROOT, TINY_OVERRIDES

MAX_EPOCHS = 5


def compose_run(tmp: Path, overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` of the tiny model with ``overrides``, run dir ``tmp/run``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=[*TINY_OVERRIDES, *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
        cfg.paths.cache_dir = str(tmp / "cache")
        del cfg.hydra
    return cfg


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, dict]:
    """Three loggers at once, early stopping that stops after the second validation
    (``min_delta=100``: only the first counts as an improvement, patience 1)."""
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = compose_run(
        tmp,
        [
            "logger=[tensorboard,mlflow,csv]",
            f"trainer.max_epochs={MAX_EPOCHS}",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=100",
        ],
    )
    metrics = train(cfg)
    return tmp / "run", metrics


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_early_stopped_run_writes_the_best_epochs_files(tracked) -> None:
    run_dir, metrics = tracked
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["epochs"] == 2 < MAX_EPOCHS  # stopped after the second validation
    best = written["best"]
    assert best["epoch"] in (0, 1)
    assert f"best-epoch{best['epoch']:02d}-" in Path(written["best_checkpoint"]).name
    predictions = json.loads((run_dir / "predictions.json").read_text())
    references = {
        r["id"]: r["answers"]["text"]
        for r in load_local_file(str(ROOT / "src/qa_lightning/resources/demo/validation.json"))
    }
    assert squad_v1_scores(predictions, references)["f1"] == pytest.approx(best["f1"])
    assert (run_dir / "hf_model" / "config.json").is_file()
    assert metrics["hf_model"] == str(run_dir / "hf_model")


def test_csv_holds_the_numbers_of_tensorboard(tracked) -> None:
    run_dir, _ = tracked
    tensorboard = scalars(run_dir)
    with (run_dir / "csv" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    for tag in ("val/f1", "val/em", "train/loss_step", "train/loss_epoch"):
        logged = [(int(r["step"]), float(r[tag])) for r in rows if r.get(tag)]
        assert len(logged) == len(tensorboard[tag]) > 0, tag
        for (step, value), (tb_step, tb_value) in zip(logged, tensorboard[tag], strict=True):
            assert step == tb_step
            assert value == pytest.approx(tb_value, rel=1e-6)  # TensorBoard stores float32


def test_mlflow_store_holds_params_history_and_artefacts(tracked) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, _ = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("qa_lightning").experiment_id], max_results=5
    )
    resolved = json.loads(json.dumps(compose_params(run_dir)))
    assert run.data.params == {k: str(v) for k, v in resolved.items()}
    history = client.get_metric_history(run.info.run_id, "val/f1")
    assert [(m.step, m.value) for m in history] == [
        (step, pytest.approx(value, abs=1e-4)) for step, value in scalars(run_dir)["val/f1"]
    ]
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "predictions.json", "hf_model", "answers"} <= artefacts
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(run_dir / "dl")))
    assert json.loads(local.read_text()) == json.loads((run_dir / "metrics.json").read_text())
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "hf_model")}
    assert "hf_model/config.json" in model_files


def compose_params(run_dir: Path) -> dict:
    import yaml

    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    return flatten(resolved["callbacks"]["hparams_summary"]["params"])


def test_answers_table_reads_back_from_tensorboard(tracked) -> None:
    run_dir, _ = tracked
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("val/answers/text_summary")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # one table per validation (none at the sanity check), at the global step it ran
    assert len(texts) == len(scalars(run_dir)["val/f1"]) == metrics["epochs"]
    assert [t.step for t in texts] == [5, 10] and metrics["global_step"] == 10
    last = texts[-1].tensor_proto.string_val[0].decode()
    lines = [line for line in last.splitlines() if line.startswith("| demo-val-")]
    assert len(lines) == 10
    assert last.count("| id | question | gold | answer | probability | f1 |") == 1
    # the last validation's answers are the ones it scored (fp32, same decoding)
    assert metrics["best"]["epoch"] == metrics["epochs"] - 1  # (seeded) so predictions.json
    predictions = json.loads((run_dir / "predictions.json").read_text())
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[3] == " ".join(predictions[cells[0]].split())
        assert 0 < float(cells[4]) <= 1


def test_answers_table_is_pure_markdown() -> None:
    rows = answer_rows(
        ["q1", "q2"],
        ["Who | what?", "When?"],
        [["the guild", "harbour guild"], []],
        [("harbour guild", 0.75), ("", 0.5)],
    )
    assert rows[0] == AnswerRow(
        "q1", "Who | what?", ("the guild", "harbour guild"), "harbour guild", 0.75, 100.0
    )
    assert rows[1].f1 == 100.0  # no gold answer (v2), answered ""
    table = answers_table(rows, title="epoch 0")
    assert table.splitlines() == [
        "**epoch 0**",
        "",
        "| " + " | ".join(ANSWER_COLUMNS) + " |",
        "|---|---|---|---|---|---|",
        "| q1 | Who \\| what? | the guild / harbour guild | harbour guild | 0.75 | 100.0 |",
        "| q2 | When? |  |  | 0.5 | 100.0 |",
    ]
    partial = answer_rows(["q"], ["Q"], [["in 1871"]], [("1871", 0.9)])
    assert partial[0].f1 == pytest.approx(66.67)
    assert spread_indices(30, 10) == [0, 3, 6, 9, 12, 16, 19, 22, 25, 29]
    assert spread_indices(3, 10) == [0, 1, 2]
    assert spread_indices(0, 10) == []


def test_early_stopping_is_off_by_default(compose_train) -> None:
    cfg = compose_train(TINY_OVERRIDES)
    assert cfg.callbacks.early_stopping.patience is None
    assert instantiate(cfg.callbacks.early_stopping) is None
    stopping = early_stopping(patience=3, monitor="val/f1", mode="max")
    assert isinstance(stopping, EarlyStopping)
    assert (stopping.patience, stopping.monitor, stopping.mode) == (3, "val/f1", "max")


def test_rich_callbacks_option(compose_train) -> None:
    pytest.importorskip("rich")
    cfg = compose_train([*TINY_OVERRIDES, "callbacks=rich"])
    callbacks = {name: instantiate(c) for name, c in cfg.callbacks.items()}
    assert isinstance(callbacks["progress_bar"], RichProgressBar)
    assert isinstance(callbacks["model_summary"], RichModelSummary)
    assert "model_checkpoint" in callbacks and "validation_answers" in callbacks


def test_wandb_offline_logs_params_metrics_and_answers(tmp_path) -> None:
    pytest.importorskip("wandb")
    cfg = compose_run(tmp_path, ["logger=[tensorboard,wandb]"])
    train(cfg)
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert (run / f"run-{run.name.rsplit('-', 1)[1]}.wandb").stat().st_size > 0
    (table,) = (run / "files" / "media" / "table" / "val").glob("answers_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == list(ANSWER_COLUMNS)
    assert len(logged["data"]) == 10
    assert all(re.fullmatch(r"demo-val-\d{4}", row[0]) for row in logged["data"])
