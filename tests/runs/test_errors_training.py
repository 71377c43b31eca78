"""Training that cannot go on stops with a one-paragraph error and loses nothing: a non-finite
loss keeps the last good ``last.ckpt``, running out of memory saves the progress, a full disk
keeps the previous checkpoint intact."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from qa_lightning.core.errors import ResourceError
from qa_lightning.model import QAModule
from qa_lightning.runs.checkpoint_writing import AtomicCheckpointIO
from qa_lightning.train import diverged_error, train
from tests.conftest import TINY_OVERRIDES, read_batches
from tests.test_errors import _short_errors, cli_error, in_process_error, run_cli  # noqa: F401

#: 70 demo questions -> 78 windows -> 5 steps an epoch with batches of 16; last.ckpt every 2 steps
EVERY_2_STEPS = [
    *TINY_OVERRIDES,
    "trainer.max_epochs=2",
    "callbacks.last_checkpoint.every_n_train_steps=2",
]


class PoisonWeights(L.Callback):
    """Sets the QA head's weights to infinity before the batch of ``at_step``: from then on the
    logits, hence the loss, are not finite (as after an overflow or a diverging update)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.model.qa_outputs.weight.fill_(float("inf"))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_finite_weights(checkpoint: dict) -> None:
    for name, tensor in checkpoint["state_dict"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


def test_cli_non_finite_loss_is_a_clear_error_and_writes_no_diverged_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cli_error(
        run_cli(
            "qa_lightning.train",
            *TINY_OVERRIDES,
            "model.lr=1e30",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}",
        ),
        "training stopped: non-finite training loss (nan) at step 1",
        "model.lr=1e+30",
        "trainer.gradient_clip_val=1.0",
        "No checkpoint of the diverged weights was written",
    )
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not (run_dir / "metrics.json").exists()


def test_non_finite_loss_is_found_at_the_next_check_without_a_sync_every_step(
    compose_train, capsys
) -> None:
    every_3_steps = [o for o in TINY_OVERRIDES if not o.startswith("trainer.log_every_n_steps")]
    cfg = compose_train(
        [
            *every_3_steps,
            "trainer.log_every_n_steps=3",
            "+callbacks.poison._target_=tests.runs.test_errors_training.PoisonWeights",
            "+callbacks.poison.at_step=1",
            "+callbacks.record._target_=tests.conftest.RecordBatches",
        ]
    )
    in_process_error(capsys, lambda: train(cfg), "non-finite training loss (nan) at step 1")
    run_dir = Path(cfg.paths.output_dir)
    # the loss of steps 1 and 2 stayed on the device: found when it is logged, after step 2
    assert [batch["step"] for batch in read_batches(run_dir, 0)] == [0, 1, 2]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize(("clip", "suggested"), [("1.0", False), ("null", True)])
def test_diverged_error_suggests_clipping_only_where_it_was_off(
    compose_train, tmp_path, clip, suggested
) -> None:
    cfg = compose_train([*TINY_OVERRIDES, f"trainer.gradient_clip_val={clip}"])
    message = str(diverged_error(FloatingPointError("nan"), cfg, tmp_path / "last.ckpt"))
    assert f"trainer.gradient_clip_val={1.0 if clip == '1.0' else None}: lower model.lr" in message
    assert ("clip gradients (trainer.gradient_clip_val=1.0)" in message) is suggested


def test_non_finite_loss_keeps_the_last_good_checkpoint_which_resumes(
    compose_train, capsys
) -> None:
    poison = [
        "+callbacks.poison._target_=tests.runs.test_errors_training.PoisonWeights",
        "+callbacks.poison.at_step=3",
    ]
    cfg = compose_train([*EVERY_2_STEPS, *poison])
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    in_process_error(
        capsys,
        lambda: train(cfg),
        "non-finite training loss (nan) at step 3",
        f"'{last}' was saved before the loss diverged and is kept",
    )
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 2  # not overwritten on the way out with inf weights
    assert_finite_weights(checkpoint)

    # nothing lost: the run continues from the good checkpoint
    metrics = train(compose_train([*EVERY_2_STEPS, "resume=true"]))
    assert metrics["global_step"] == 10
    assert metrics["epochs"] == 2


def test_out_of_memory_names_the_settings_and_saves_the_progress(
    compose_train, capsys, monkeypatch
) -> None:
    training_step = QAModule.training_step

    def oom_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(QAModule, "training_step", oom_at_step_3)
    cfg = compose_train(EVERY_2_STEPS)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    in_process_error(
        capsys,
        lambda: train(cfg),
        "out of memory while training (OutOfMemoryError: CUDA out of memory.",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "data.max_length=128",
        "trainer.precision=32-true",
        "trainer.accumulate_grad_batches=1",
        f"Progress so far is in '{last}': continue with resume=true",
    )
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 3  # saved on the way out: nothing lost
    assert_finite_weights(checkpoint)


def disk_fills_after(monkeypatch, saves: int) -> list[Path]:
    """``torch.save`` succeeds ``saves`` times, then writes a few bytes and finds the disk full.
    Returns the paths of the checkpoints that failed."""
    save = torch.save
    failed: list[Path] = []

    def save_until_full(obj, file, *args, **kwargs):
        nonlocal saves
        if saves > 0:
            saves -= 1
            return save(obj, file, *args, **kwargs)
        file.write(b"PK\x03\x04 partial")
        failed.append(Path(file.name))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    return failed


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    compose_train, capsys, monkeypatch
) -> None:
    cfg = compose_train([*TINY_OVERRIDES, "callbacks.last_checkpoint.every_n_train_steps=1"])
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    failed = disk_fills_after(monkeypatch, saves=2)  # last.ckpt at steps 1 and 2, then full
    in_process_error(
        capsys,
        lambda: train(cfg),
        f"no space left on the disk of '{checkpoints}'",
        f"while saving checkpoint '{checkpoints / 'last.ckpt'}'",
        "the previous 'last.ckpt' is kept intact",
        "callbacks.last_checkpoint.every_n_train_steps=N",
        f"resume=true hydra.run.dir={cfg.paths.output_dir}",
    )
    assert failed == [checkpoints / f"last.ckpt.{os.getpid()}.part"]  # one attempt
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # no .part left
    monkeypatch.undo()
    checkpoint = load_checkpoint(checkpoints / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert_finite_weights(checkpoint)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_atomic_checkpoint_io_reports_a_full_disk(tmp_path: Path, monkeypatch, code) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def fsync_full(fd: int) -> None:
        raise OSError(code, "No space left on device")

    monkeypatch.setattr("qa_lightning.core.integrity.os.fsync", fsync_full)
    with pytest.raises(ResourceError, match="the previous 'last.ckpt' is kept intact"):
        io.save_checkpoint({"step": 2}, path)
    with pytest.raises(ResourceError, match="no earlier 'other.ckpt' existed"):
        io.save_checkpoint({"step": 2}, tmp_path / "checkpoints" / "other.ckpt")
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
