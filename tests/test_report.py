"""Sweep summaries: a real 2x2 multirun of tiny runs, a sweep with a failing run, and the report
on hand-made run dirs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qa_lightning.report import main, summarize, to_markdown, write_report
from tests.conftest import ROOT, TINY_OVERRIDES

BASE = [o for o in TINY_OVERRIDES if not o.startswith("data.stride=")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir = tmp / "sweep"
    result = run_module(
        "qa_lightning.train",
        "-m",
        *BASE,
        "model.lr=1e-3,3e-3",
        "data.stride=32,48",
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result


def test_sweep_writes_summary_with_each_runs_best_scores(sweep) -> None:
    sweep_dir, _ = sweep
    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 4
    assert {(float(r["lr"]), int(float(r["stride"]))) for r in rows} == {
        (1e-3, 32), (1e-3, 48), (3e-3, 32), (3e-3, 48),
    }  # fmt: skip
    for row in rows:
        metrics = json.loads((sweep_dir / row["run"] / "metrics.json").read_text())
        assert row["status"] == "ok"
        assert float(row["f1"]) == pytest.approx(metrics["best"]["f1"])
        assert float(row["em"]) == pytest.approx(metrics["best"]["em"])
        assert int(row["best_epoch"]) == metrics["best"]["epoch"]
        assert float(row["wall_time_s"]) == pytest.approx(metrics["wall_time_s"])
        assert f"data.stride={int(float(row['stride']))}" in row["overrides"].split()
        assert "model.lr=" in row["overrides"]
    f1s = [float(r["f1"]) for r in rows]
    assert f1s == sorted(f1s, reverse=True)

    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown.count("| ok |") == 4
    assert "Overrides of every run: `model=tiny" in markdown
    assert (sweep_dir / "summary.png").read_bytes().startswith(PNG_MAGIC)


def test_report_cli_rewrites_the_summary(sweep) -> None:
    sweep_dir, _ = sweep
    before = (sweep_dir / "summary.csv").read_text()
    (sweep_dir / "summary.csv").unlink()
    result = run_module("qa_lightning.report", str(sweep_dir))
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "summary.csv").read_text() == before
    assert "| run | overrides | F1 |" in result.stdout


def test_each_run_reaches_tensorboards_hparams_tab(sweep) -> None:
    sweep_dir, _ = sweep
    events = EventAccumulator(str(sweep_dir / "0" / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    session = content["_hparams_/session_start_info"]
    assert b"model.lr" in session and b"data.stride" in session and b"seed" in session
    assert "hp/f1_best" in events.Tags()["scalars"]


def test_failed_run_does_not_stop_the_sweep_and_is_listed(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_module(
        "qa_lightning.train",
        "-m",
        *BASE,
        "data.stride=500,32",  # 500 >= data.max_length: job 0 fails its config check
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    # Hydra's basic sweeper runs every job, then re-raises the first failure
    assert result.returncode != 0
    assert (sweep_dir / "1" / "metrics.json").is_file()
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("1", "ok"), ("0", "failed")]
    assert "ConfigError" in rows[1]["error"] and "data.stride" in rows[1]["error"]
    assert "data.stride" in (sweep_dir / "0" / "error.txt").read_text()
    assert (
        "| failed: qa_lightning.errors.ConfigError: invalid config: data.stride=500"
        in (sweep_dir / "summary.md").read_text()
    )


def make_run(
    sweep_dir: Path,
    name: str,
    lr: float,
    stride: int,
    best: dict | None = None,
    error: str | None = None,
) -> Path:
    run = sweep_dir / name
    (run / ".hydra").mkdir(parents=True)
    overrides = ["model=tiny", f"model.lr={lr}", f"data.stride={stride}"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"model": {"lr": lr}, "data": {"stride": stride}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if best is not None:
        metrics = {"final": best, "best": best, "wall_time_s": 12.5}
        (run / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (run / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    return run


def test_report_on_hand_made_runs_lists_failures_last(tmp_path: Path) -> None:
    make_run(tmp_path, "0", 1e-5, 64, best={"f1": 40.0, "em": 30.0, "epoch": 1})
    make_run(tmp_path, "1", 3e-5, 64, error="qa_lightning.errors.DataError: bad record 17")
    make_run(tmp_path, "2", 1e-5, 128, best={"f1": 55.5, "em": 41.25, "epoch": 2})
    make_run(tmp_path, "10", 3e-5, 128)  # killed: no metrics.json, no error.txt
    make_run(tmp_path, "3", 3e-5, 32, best={"f1": -1.0, "em": -1.0, "epoch": -1})

    rows = write_report(tmp_path)
    assert [(r["run"], r["status"]) for r in rows] == [
        ("2", "ok"), ("0", "ok"), ("1", "failed"), ("3", "failed"), ("10", "failed"),
    ]  # fmt: skip
    assert rows[0] | {"overrides": "", "error": ""} == {
        "run": "2", "status": "ok", "f1": 55.5, "em": 41.25, "best_epoch": 2,
        "wall_time_s": 12.5, "lr": 1e-5, "stride": 128.0, "overrides": "", "error": "",
    }  # fmt: skip
    assert rows[0]["overrides"] == "model=tiny model.lr=1e-05 data.stride=128"
    assert rows[2]["error"] == "qa_lightning.errors.DataError: bad record 17"
    assert "no validation score" in rows[3]["error"]
    assert "no metrics.json" in rows[4]["error"]

    table = read_csv(tmp_path / "summary.csv")
    assert [r["run"] for r in table] == ["2", "0", "1", "3", "10"]
    assert table[2]["f1"] == "" and table[0]["f1"] == "55.5"
    markdown = (tmp_path / "summary.md").read_text()
    assert "5 runs, 2 ok, 3 failed" in markdown
    assert "Overrides of every run: `model=tiny`" in markdown
    assert "| 2 | `model.lr=1e-05 data.stride=128` | 55.50 | 41.25 | 2 | 12.5 | ok |" in markdown
    assert "| failed: qa_lightning.errors.DataError: bad record 17 |" in markdown
    assert (tmp_path / "summary.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob("*.part"))


def test_report_of_only_failed_runs_still_writes_every_file(tmp_path: Path) -> None:
    make_run(tmp_path, "0", 1e-5, 64)
    rows = summarize(tmp_path)
    assert [r["status"] for r in rows] == ["failed"]
    assert "0 ok, 1 failed" in to_markdown(rows)
    assert main([str(tmp_path)]) == 0
    assert all((tmp_path / name).is_file() for name in ("summary.csv", "summary.md", "summary.png"))


def test_report_cli_rejects_a_dir_without_runs(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
