"""Checkpoints that survive crashes and pre-emption, and resume training exactly.

- :class:`AtomicCheckpointIO` (``trainer.plugins``): a crash while saving keeps the previous file;
  a full disk is a :class:`~qa_lightning.core.errors.ResourceError` saying so.
- :class:`LastCheckpoint` (``callbacks.last_checkpoint``): ``last.ckpt`` every N steps, at every
  epoch end, and when training stops on an exception or signal (SIGTERM: Lightning stops after
  the current batch and calls ``on_exception``), except a non-finite loss or a full disk.

Checkpoints hold only tensors and plain Python values (dict, list, tuple, str, int, float, bool,
None): hyperparameters are saved as plain containers (:func:`~qa_lightning.core.plain.plain`), RNG
states as tensors. :mod:`qa_lightning.runs.checkpoint_reading` reads them back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from qa_lightning.core.errors import ResourceError
from qa_lightning.core.integrity import disk_full_cause, free_space, is_disk_full, write_atomic

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint with :func:`~qa_lightning.core.integrity.write_atomic` (to
    ``<name>.<pid>.part`` beside it, synced to disk, then renamed).

    Lightning's own save goes through a temporary file under ``/tmp`` and ``shutil.move``, which
    copies (non-atomically) when ``/tmp`` and the run dir are on different file systems, as on
    most clusters. Remote paths (``s3://`` ...) keep Lightning's behaviour.

    A full disk (``ENOSPC``, ``EDQUOT``) raises a :class:`ResourceError` that says which
    checkpoint was kept and how to make room.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda file: torch.save(checkpoint, file), disk_full_error)


def disk_full_error(path: Path, error: BaseException) -> ResourceError:
    """What was kept and how to make room, when saving checkpoint ``path`` found the disk full."""
    kept = (
        f"the previous '{path.name}' is kept intact"
        if path.is_file()
        else f"no earlier '{path.name}' existed, other checkpoints are untouched"
    )
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    error = disk_full_cause(error) or error  # the OSError, not torch's error raised from it
    return ResourceError(
        f"no space left on the disk of '{path.parent}' ({free_space(path.parent)}) while saving "
        f"checkpoint '{path}' ({type(error).__name__}: {error}); {kept}. Free disk space, or run "
        "on a disk with room (hydra.run.dir=DIR), keep fewer checkpoints "
        "(callbacks.model_checkpoint.save_top_k=1) or save last.ckpt less often "
        "(callbacks.last_checkpoint.every_n_train_steps=N); then continue with resume=true "
        f"hydra.run.dir={run_dir}."
    )


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: every ``every_n_train_steps`` optimizer steps, at the end of every epoch and
    when training stops on an exception or SIGTERM (pre-emption), so that ``resume=true`` loses
    at most one interval.

    Not when the exception is a non-finite loss (``FloatingPointError``: the weights have
    diverged and would replace the last good ``last.ckpt``) or a full disk (the save would fail
    again).

    Never during validation, nor after the last batch of an epoch before the epoch ends: resumed
    from there, Lightning would score a partial epoch, or skip the epoch's validation. Never under
    ``trainer.fast_dev_run`` (``debug=fdr``), as Lightning's checkpoints.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_train_steps: int | None = None,
        save_on_exception: bool = True,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps or 0,
            enable_version_counter=False,  # always last.ckpt, never last-v1.ckpt
        )
        self.save_last_on_exception = save_on_exception

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not _last_batch_of_epoch(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own saves last.ckpt here also under fast_dev_run (no other save does);
        # every epoch end saved it already
        if not self._should_skip_saving_checkpoint(trainer):
            super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if (
            self.save_last_on_exception
            and not isinstance(exception, FloatingPointError)
            and not is_disk_full(exception)
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.fast_dev_run
            and not trainer.validating  # also excludes the sanity check
            and not _last_batch_of_epoch(trainer)
            and self._last_global_step_saved != trainer.global_step  # 0 before the first step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _last_batch_of_epoch(trainer: L.Trainer) -> bool:
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
