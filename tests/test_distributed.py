"""DDP: validating a checkpoint with 2 CPU processes (gloo) scores exactly as 1 process.

The validation windows (89, odd) are sharded over the ranks by Lightning's DistributedSampler,
which repeats a window to even the shards; each rank's best spans are gathered, and the
per-question maximum makes the repeat harmless, so every question is scored once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from qa_lightning.config import minilm_path, resource_path
from qa_lightning.data import SquadDataModule
from qa_lightning.train import train
from tests.conftest import ROOT, SHORT_WINDOWS, TINY_OVERRIDES


def evaluate_cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "qa_lightning.evaluate",
            "data=demo",
            *(f"data.{key}={value}" for key, value in SHORT_WINDOWS.items()),
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_validation_windows_split_unevenly_over_two_ranks() -> None:
    datamodule = SquadDataModule(
        minilm_path(),
        dataset_name=None,
        train_file=resource_path("demo/train.json"),
        validation_file=resource_path("demo/validation.json"),
        cache_dir=None,
        **SHORT_WINDOWS,
    )
    datamodule.setup("validate")
    windows_per_question = Counter(datamodule.val_windows["example_index"])
    assert len(datamodule.val_windows) % 2 == 1
    assert len(windows_per_question) == 30
    assert min(windows_per_question.values()) > 1


def test_two_process_validation_scores_exactly_as_one(compose_train, tmp_path: Path) -> None:
    metrics = train(compose_train(TINY_OVERRIDES))
    checkpoint = metrics["best_checkpoint"]
    common = [f"ckpt_path={checkpoint}", f"paths.cache_dir={tmp_path / 'cache'}"]

    one = evaluate_cli(tmp_path / "one", "trainer=cpu", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = evaluate_cli(tmp_path / "two", "trainer=ddp_cpu", *common)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "MEMBER: 2/2" in two.stderr + two.stdout

    scores = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two")]
    assert scores[0]["windows"] == scores[1]["windows"] == 89
    assert scores[0]["questions"] == scores[1]["questions"] == 30
    assert (scores[1]["em"], scores[1]["f1"]) == (scores[0]["em"], scores[0]["f1"])
    predictions = [
        json.loads((tmp_path / run / "predictions.json").read_text()) for run in ("one", "two")
    ]
    assert len(predictions[1]) == 30
    assert predictions[1] == predictions[0]
