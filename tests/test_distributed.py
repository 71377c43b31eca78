"""DDP with 2 CPU processes (gloo): training and validation.

Training: each rank gets whole batches of one global, length-grouped order (round j: global
batches 2j and 2j + 1), as many as the other, every window once an epoch; the data are tokenised
once; a run resumed mid-epoch ends exactly as the uninterrupted one.

Validation: the windows (89, odd) are sharded over the ranks as Lightning's DistributedSampler
does, which repeats a window to even the shards; each rank's best spans are gathered, and the
per-question maximum makes the repeat harmless, so every question is scored once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.data import SquadDataModule
from qa_lightning.data.sampling import length_grouped_order
from qa_lightning.train import train
from tests.conftest import ROOT, SHORT_WINDOWS, TINY_OVERRIDES, read_batches, run_cli
from tests.runs.test_resume import KEEP_EVERY_2_STEPS, assert_same_run


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
    # verbose: Lightning's line naming the process group (quiet by default)
    two = evaluate_cli(tmp_path / "two", "trainer=ddp_cpu", "verbose=true", *common)
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


# -- training ----------------------------------------------------------------------------------

#: The demo's 78 training windows, batches of 16 per rank: 2 rounds of 32 windows, then the last
#: 14 split 7 / 7; 3 steps an epoch on 2 ranks (5 on one process), last.ckpt kept at steps 2, 3
#: (end of epoch 0), 4 and 6.
TWO_RANK_BATCHES = [(0, 16), (32, 16), (64, 7)]  # rank 0's (start, size); rank 1's: start + size


def two_process_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = run_cli(
        "qa_lightning.train",
        *KEEP_EVERY_2_STEPS,
        "trainer=ddp_cpu",
        "verbose=true",  # Lightning's line naming the process group
        f"paths.cache_dir={run_dir.parent / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # with verbose=true
    return result


@pytest.fixture(
    scope="module",
    params=[True, pytest.param(False, marks=pytest.mark.slow)],
    ids=["grouped", "random"],
)
def two_process_run(request, tmp_path_factory) -> tuple[Path, bool]:
    """A 2-epoch run of the tiny model with 2 gloo processes: its run dir, and whether its
    batches were length-grouped."""
    run_dir = tmp_path_factory.mktemp("ddp") / "straight"
    two_process_train(run_dir, f"data.group_by_length={request.param}")
    return run_dir, request.param


def test_two_process_training_gives_each_rank_whole_batches_of_one_order(
    two_process_run, compose_train
) -> None:
    run_dir, grouped = two_process_run
    ranks = [read_batches(run_dir, rank) for rank in (0, 1)]
    assert [len(batches) for batches in ranks] == [6, 6]  # 3 an epoch on each rank

    # the same run on one process, and its windows
    cfg = compose_train([*KEEP_EVERY_2_STEPS, f"data.group_by_length={grouped}"])
    single = train(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    windows = datamodule.train_windows["input_ids"][:]
    lengths = [len(ids) for ids in windows]
    assert len(windows) == 78

    for epoch in (0, 1):
        seed = cfg.seed + epoch
        order = (
            length_grouped_order(lengths, 16, seed, longest_first=2)
            if grouped
            else np.random.default_rng(seed).permutation(78).tolist()
        )
        for rank, batches in enumerate(ranks):
            received = [b["windows"] for b in batches if b["epoch"] == epoch]
            expected = [
                [windows[i] for i in order[start + rank * size : start + (rank + 1) * size]]
                for start, size in TWO_RANK_BATCHES
            ]
            assert received == expected, (epoch, rank)
        # every window once an epoch, over both ranks
        seen = Counter(
            tuple(w)
            for batches in ranks
            for b in batches
            if b["epoch"] == epoch
            for w in b["windows"]
        )
        assert seen == Counter(tuple(w) for w in windows)

    if grouped:
        for batches in ranks:
            padded = [b["padded"] for b in batches]
            assert padded[0] == max(padded)  # each rank starts with its longest batch
            for b in batches:
                window_lengths = [len(w) for w in b["windows"]]
                assert window_lengths == sorted(window_lengths, reverse=True)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["global_step"], metrics["epochs"]) == (6, 2)
    assert (metrics["train_questions"], metrics["train_windows"]) == (70, 78)
    assert metrics["validation_questions"] == single["validation_questions"] == 30
    # padded tokens per window: all ranks' batches, as received
    padded_tokens = sum(b["padded"] * len(b["windows"]) for batches in ranks for b in batches)
    assert metrics["train_tokens_per_window"] == round(padded_tokens / (2 * 78), 2)
    print(
        f"train_tokens_per_window (grouped={grouped}): 2 processes "
        f"{metrics['train_tokens_per_window']}, 1 process {single['train_tokens_per_window']}"
    )
    assert metrics["train_tokens_per_window"] == pytest.approx(
        single["train_tokens_per_window"], rel=0.05
    )

    # tokenised once: by rank 0 before the other process started, which loads the cache
    first, other = (
        (run_dir / name).read_text() for name in ("train.log", "train_ddp_process_1.log")
    )
    assert first.count("tokenising 70 train questions") == 1
    assert first.count("tokenising 30 eval questions") == 1
    assert "tokenising" not in other
    assert other.count("loading cached windows") == 2


@pytest.mark.parametrize(
    "step",
    [4, pytest.param(3, marks=pytest.mark.slow)],
    ids=["mid-epoch", "epoch-end"],  # epoch 1 after its first batch; the end of epoch 0
)
def test_two_process_run_resumed_ends_as_the_uninterrupted_one(two_process_run, step) -> None:
    straight, grouped = two_process_run
    checkpoint = straight / "checkpoints" / f"step-{step}.ckpt"
    resumed = straight.parent / f"resumed-{step}"
    two_process_train(resumed, f"data.group_by_length={grouped}", f"ckpt_path={checkpoint}")
    assert_same_run(straight, resumed)
    for rank in (0, 1):  # each rank trained on the uninterrupted run's remaining batches
        assert read_batches(resumed, rank) == read_batches(straight, rank)[step:]
