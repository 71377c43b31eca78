"""Exact resume: a run killed after a mid-epoch checkpoint and resumed with ``resume=true`` ends
exactly as the uninterrupted run; atomic checkpoint writes; the resumable train loader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from qa_lightning.data.sampling import LengthGroupedSampler, ResumableDataLoader
from qa_lightning.runs.checkpoint_writing import AtomicCheckpointIO
from qa_lightning.train import train
from tests.conftest import ROOT, TINY_OVERRIDES, read_batches

EPOCHS = 2  # the demo's 78 training windows in batches of 16: 5 steps per epoch
INTERVAL = 3  # last.ckpt at steps 3, 6, 9 and at each epoch end (5, 10)


def train_command(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qa_lightning.train",
        *TINY_OVERRIDES,
        f"trainer.max_epochs={EPOCHS}",
        "trainer.deterministic=true",
        f"callbacks.last_checkpoint.every_n_train_steps={INTERVAL}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # nothing but plain values


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    cache = tmp_path / "cache"  # both runs may build it: the cache is written atomically
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = subprocess.Popen(
        train_command(straight_dir, cache), cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed = subprocess.Popen(
        train_command(resumed_dir, cache), cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = resumed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (resumed_dir / "metrics.json").exists()
    interrupted_at = load(last)["global_step"]
    assert 0 < interrupted_at < EPOCHS * 5

    resumed = subprocess.run(
        train_command(resumed_dir, cache, "resume=true"),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"Restoring states from the checkpoint path at {last}"
        in resumed.stderr + (resumed_dir / "train.log").read_text()
    )
    _, straight_err = straight.communicate(timeout=600)
    assert straight.returncode == 0, straight_err[-3000:]

    expected = json.loads((straight_dir / "metrics.json").read_text())
    actual = json.loads((resumed_dir / "metrics.json").read_text())
    for key in ("final", "best", "epochs", "global_step"):
        assert actual[key] == expected[key], key
    assert actual["global_step"] == EPOCHS * 5
    expected_weights = load(straight_dir / "checkpoints" / "last.ckpt")["state_dict"]
    actual_weights = load(last)["state_dict"]
    assert expected_weights.keys() == actual_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(tensor, actual_weights[name]), name
    assert (resumed_dir / "predictions.json").read_text() == (
        straight_dir / "predictions.json"
    ).read_text()
    # both processes logged into the same TensorBoard run
    events = list((resumed_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2
    assert not list((resumed_dir / "tensorboard").glob("version_*"))


def assert_same_run(expected_dir: Path, actual_dir: Path) -> None:
    """Same final weights, scores, steps, padding and predictions."""
    expected = json.loads((expected_dir / "metrics.json").read_text())
    actual = json.loads((actual_dir / "metrics.json").read_text())
    for key in ("final", "best", "epochs", "global_step", "train_tokens_per_window"):
        assert actual[key] == expected[key], key
    expected_weights = load(expected_dir / "checkpoints" / "last.ckpt")["state_dict"]
    actual_weights = load(actual_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert expected_weights.keys() == actual_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(tensor, actual_weights[name]), name
    predictions = [(d / "predictions.json").read_text() for d in (expected_dir, actual_dir)]
    assert predictions[1] == predictions[0]


#: last.ckpt at steps 2, 4, 6, 8 and at the epoch ends (5, 10), each kept as step-N.ckpt
KEEP_EVERY_2_STEPS = [
    *TINY_OVERRIDES,
    f"trainer.max_epochs={EPOCHS}",
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "callbacks.last_checkpoint._target_=tests.conftest.KeepingLastCheckpoint",
    "+callbacks.record._target_=tests.conftest.RecordBatches",
]


@pytest.mark.parametrize("group_by_length", [True, False], ids=["grouped", "random"])
def test_resumed_at_an_epoch_end_or_mid_epoch_ends_as_the_uninterrupted_run(
    compose_train, tmp_path: Path, group_by_length: bool
) -> None:
    overrides = [*KEEP_EVERY_2_STEPS, f"data.group_by_length={group_by_length}"]

    def run(name: str, *extra: str) -> Path:
        cfg = compose_train([*overrides, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        train(cfg)
        return tmp_path / name

    straight = run("straight")
    checkpoints = straight / "checkpoints"
    assert load(checkpoints / "step-5.ckpt")["epoch"] == 0  # saved at the end of epoch 0
    for step in (5, 8):  # an epoch end; the third batch of epoch 1
        resumed = run(f"resumed-{step}", f"ckpt_path={checkpoints / f'step-{step}.ckpt'}")
        assert_same_run(straight, resumed)
        # the resumed run trained on the uninterrupted run's remaining batches
        assert read_batches(resumed, 0) == read_batches(straight, 0)[step:]
    if not group_by_length:  # random batches: a new order each epoch
        batches = read_batches(straight, 0)
        assert [b["windows"] for b in batches[:5]] != [b["windows"] for b in batches[5:]]


def test_sigterm_saves_last_checkpoint_before_stopping(tmp_path: Path) -> None:
    """Pre-emption: Lightning stops after the current batch, last_checkpoint saves on exit."""
    run_dir = tmp_path / "run"
    # enough epochs that the run is still going a second after its first checkpoint, also on an
    # idle machine (with 3, the tiny model finished before the signal came)
    epochs = 50
    command = [
        *train_command(run_dir, tmp_path / "cache", "data.batch_size=4"),  # 20 steps per epoch
        f"trainer.max_epochs={epochs}",
        "callbacks.last_checkpoint.every_n_train_steps=1000",  # epoch ends only
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert load(last)["global_step"] == 20  # end of epoch 0
    time.sleep(1.0)  # into epoch 1
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert "Received SIGTERM" in output
    assert not (run_dir / "metrics.json").exists()  # stopped early
    assert 20 < load(last)["global_step"] < 20 * epochs


def test_atomic_checkpoint_io_keeps_the_previous_file_when_saving_fails(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash while saving")

    with pytest.raises(RuntimeError, match="crash while saving"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path, weights_only=False) == {"step": 1}
    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resumable_loader_skips_the_batches_already_trained_on() -> None:
    lengths = [5, 9, 3, 7, 8, 2, 6, 4, 1, 10, 11]
    sampler = LengthGroupedSampler(lengths, batch_size=2, seed=3)
    loader = ResumableDataLoader(list(range(len(lengths))), batch_size=2, sampler=sampler)
    sampler.set_epoch(1)
    full = [batch.tolist() for batch in loader]
    batches = iter(loader)
    seen = [next(batches).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"batches_yielded": 2}

    again = ResumableDataLoader(list(range(len(lengths))), batch_size=2, sampler=sampler)
    again.load_state_dict(state)
    sampler.set_epoch(0)
    rest = iter(again)  # as in Lightning, the iterator is made before set_epoch is called
    sampler.set_epoch(1)
    assert seen + [batch.tolist() for batch in rest] == full
    assert [batch.tolist() for batch in again] == full  # the next epoch is whole again
