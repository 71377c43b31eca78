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

from qa_lightning.report import main
from qa_lightning.runs.sweep_report import plot_data, summarize, to_markdown, write_report
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
    assert list(rows[0])[:4] == ["run", "status", "model.lr", "data.stride"]
    assert {(float(r["model.lr"]), int(r["data.stride"])) for r in rows} == {
        (1e-3, 32), (1e-3, 48), (3e-3, 32), (3e-3, 48),
    }  # fmt: skip
    for row in rows:
        metrics = json.loads((sweep_dir / row["run"] / "metrics.json").read_text())
        assert row["status"] == "ok"
        assert float(row["f1"]) == pytest.approx(metrics["best"]["f1"])
        assert float(row["em"]) == pytest.approx(metrics["best"]["em"])
        assert int(row["best_epoch"]) == metrics["best"]["epoch"]
        assert float(row["wall_time_s"]) == pytest.approx(metrics["wall_time_s"])
        assert f"data.stride={row['data.stride']}" in row["overrides"].split()
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
    assert "| run | `model.lr` | `data.stride` | F1 |" in result.stdout


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
        "| failed: qa_lightning.core.errors.ConfigError: invalid config: data.stride=500"
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
    overrides = ["model=tiny", f"model.lr={lr}", f"data.stride={stride}"]
    return make_sweep_run(sweep_dir, name, overrides, best, error)


def make_sweep_run(
    sweep_dir: Path,
    name: str,
    overrides: list[str],
    best: dict | None = None,
    error: str | None = None,
) -> Path:
    """A run dir as a multirun job leaves it: Hydra's overrides, metrics.json or error.txt."""
    run = sweep_dir / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if best is not None:
        metrics = {"final": best, "best": best, "wall_time_s": 12.5}
        (run / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (run / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    return run


def test_report_on_hand_made_runs_lists_failures_last(tmp_path: Path) -> None:
    make_run(tmp_path, "0", 1e-5, 64, best={"f1": 40.0, "em": 30.0, "epoch": 1})
    make_run(tmp_path, "1", 3e-5, 64, error="qa_lightning.core.errors.DataError: bad record 17")
    make_run(tmp_path, "2", 1e-5, 128, best={"f1": 55.5, "em": 41.25, "epoch": 2})
    make_run(tmp_path, "10", 3e-5, 128)  # killed: no metrics.json, no error.txt
    make_run(tmp_path, "3", 3e-5, 32, best={"f1": -1.0, "em": -1.0, "epoch": -1})

    rows = write_report(tmp_path)
    assert [(r["run"], r["status"]) for r in rows] == [
        ("2", "ok"), ("0", "ok"), ("1", "failed"), ("3", "failed"), ("10", "failed"),
    ]  # fmt: skip
    assert rows[0] | {"overrides": "", "error": ""} == {
        "run": "2", "status": "ok", "f1": 55.5, "em": 41.25, "best_epoch": 2,
        "wall_time_s": 12.5, "overrides": "", "error": "",
        "params": {"model": "tiny", "model.lr": 1e-5, "data.stride": 128},
    }  # fmt: skip
    assert rows[0]["overrides"] == "model=tiny model.lr=1e-05 data.stride=128"
    assert rows[2]["error"] == "qa_lightning.core.errors.DataError: bad record 17"
    assert "no validation score" in rows[3]["error"]
    assert "no metrics.json" in rows[4]["error"]

    table = read_csv(tmp_path / "summary.csv")
    assert [r["run"] for r in table] == ["2", "0", "1", "3", "10"]
    assert table[2]["f1"] == "" and table[0]["f1"] == "55.5"
    markdown = (tmp_path / "summary.md").read_text()
    assert "5 runs, 2 ok, 3 failed" in markdown
    assert "Overrides of every run: `model=tiny`" in markdown
    assert "| 2 | 1e-05 | 128 | 55.50 | 41.25 | 2 | 12.5 | ok |" in markdown
    assert "| failed: qa_lightning.core.errors.DataError: bad record 17 |" in markdown
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


# -- any swept keys -------------------------------------------------------------------------------

#: (data.batch_size, model.warmup_ratio) -> best scores; (16, 0.2) ran out of memory
WARMUP_BY_BATCH = {
    (8, 0.0): {"f1": 40.0, "em": 30.0, "epoch": 1},
    (16, 0.0): {"f1": 38.5, "em": 28.0, "epoch": 2},
    (8, 0.1): {"f1": 45.25, "em": 33.0, "epoch": 1},
    (16, 0.1): {"f1": 41.0, "em": 31.5, "epoch": 1},
    (8, 0.2): {"f1": 43.0, "em": 32.0, "epoch": 0},
    (16, 0.2): None,
}


@pytest.fixture
def warmup_sweep(tmp_path: Path) -> Path:
    """Hand-made runs of ``-m data.batch_size=8,16 model.warmup_ratio=0,0.1,0.2``."""
    for number, ((batch, warmup), best) in enumerate(WARMUP_BY_BATCH.items()):
        overrides = ["model=tiny", "data=demo", f"data.batch_size={batch}"]
        overrides.append(f"model.warmup_ratio={warmup}")
        error = None if best else "torch.OutOfMemoryError: CUDA out of memory"
        make_sweep_run(tmp_path, str(number), overrides, best, error)
    return tmp_path


def test_sweep_over_warmup_and_batch_size_has_their_columns(warmup_sweep: Path) -> None:
    rows = write_report(warmup_sweep)
    table = read_csv(warmup_sweep / "summary.csv")
    assert list(table[0]) == [
        "run", "status", "data.batch_size", "model.warmup_ratio",
        "f1", "em", "best_epoch", "wall_time_s", "overrides", "error",
    ]  # fmt: skip
    cells = [(r["run"], r["data.batch_size"], r["model.warmup_ratio"], r["f1"]) for r in table]
    assert cells == [
        ("2", "8", "0.1", "45.25"), ("4", "8", "0.2", "43.0"), ("3", "16", "0.1", "41.0"),
        ("0", "8", "0.0", "40.0"), ("1", "16", "0.0", "38.5"), ("5", "16", "0.2", ""),
    ]  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed"]
    assert rows[-1]["error"] == "torch.OutOfMemoryError: CUDA out of memory"

    markdown = (warmup_sweep / "summary.md").read_text()
    assert "Overrides of every run: `model=tiny data=demo`" in markdown
    header = "| run | `data.batch_size` | `model.warmup_ratio` | F1 | EM | best epoch |"
    assert header in markdown
    assert "| 2 | 8 | 0.1 | 45.25 | 33.00 | 1 | 12.5 | ok |" in markdown
    assert "| 5 | 16 | 0.2 |  |  |  |  | failed: torch.OutOfMemoryError" in markdown
    assert (warmup_sweep / "summary.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_puts_the_key_with_most_values_on_x_one_line_per_other(warmup_sweep: Path) -> None:
    rows = summarize(warmup_sweep)
    assert plot_data(rows) == {
        "x": "model.warmup_ratio",  # 3 values against data.batch_size's 2
        "lines": ["data.batch_size"],
        "panels": [],
        "series": {
            "": {
                "data.batch_size=8": [(0.0, 40.0), (0.1, 45.25), (0.2, 43.0)],
                "data.batch_size=16": [(0.0, 38.5), (0.1, 41.0)],  # (16, 0.2) failed
            }
        },
    }
    assert plot_data(rows, x="data.batch_size")["series"] == {
        "": {
            "model.warmup_ratio=0": [(8, 40.0), (16, 38.5)],
            "model.warmup_ratio=0.1": [(8, 45.25), (16, 41.0)],
            "model.warmup_ratio=0.2": [(8, 43.0)],
        }
    }


def test_report_cli_takes_the_x_axis_and_rejects_a_key_not_swept(warmup_sweep, capsys) -> None:
    assert main([str(warmup_sweep), "--x", "data.batch_size"]) == 0
    assert (warmup_sweep / "summary.png").read_bytes().startswith(PNG_MAGIC)
    assert main([str(warmup_sweep), "--x", "model.lr"]) == 2
    assert "--x model.lr is not a swept key" in capsys.readouterr().err


def test_three_swept_keys_make_a_panel_per_value_of_the_third(tmp_path: Path) -> None:
    for number, (lr, stride, epochs) in enumerate(
        (lr, stride, epochs) for lr in (1e-5, 3e-5) for stride in (64, 128) for epochs in (1, 2)
    ):
        overrides = [f"model.lr={lr}", f"data.stride={stride}", f"trainer.max_epochs={epochs}"]
        best = {"f1": 10.0 * number, "em": 1.0, "epoch": 0}
        make_sweep_run(tmp_path, str(number), overrides, best)
    rows = write_report(tmp_path)
    data = plot_data(rows)
    assert (data["x"], data["lines"], data["panels"]) == (
        "model.lr", ["data.stride"], ["trainer.max_epochs"],
    )  # fmt: skip
    assert data["series"] == {
        "trainer.max_epochs=1": {
            "data.stride=64": [(1e-5, 0.0), (3e-5, 40.0)],
            "data.stride=128": [(1e-5, 20.0), (3e-5, 60.0)],
        },
        "trainer.max_epochs=2": {
            "data.stride=64": [(1e-5, 10.0), (3e-5, 50.0)],
            "data.stride=128": [(1e-5, 30.0), (3e-5, 70.0)],
        },
    }
    assert (tmp_path / "summary.png").read_bytes().startswith(PNG_MAGIC)


def test_a_sweep_over_config_choices_plots_them_as_categories(tmp_path: Path) -> None:
    make_sweep_run(tmp_path, "0", ["model=tiny", "data=demo"], {"f1": 5.0, "em": 0.0, "epoch": 0})
    make_sweep_run(
        tmp_path, "1", ["model=minilm", "data=demo"], {"f1": 50.0, "em": 40.0, "epoch": 1}
    )
    rows = write_report(tmp_path)
    assert read_csv(tmp_path / "summary.csv")[0]["model"] == "minilm"
    assert plot_data(rows) == {
        "x": "model",
        "lines": [],
        "panels": [],
        "series": {"": {"": [("minilm", 50.0), ("tiny", 5.0)]}},
    }
    assert (tmp_path / "summary.png").read_bytes().startswith(PNG_MAGIC)
