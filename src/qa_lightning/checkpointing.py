"""Checkpoints that survive crashes and pre-emption, and resume training exactly.

- :class:`AtomicCheckpointIO` (``trainer.plugins``): a crash while saving keeps the previous file.
- :class:`LastCheckpoint` (``callbacks.last_checkpoint``): ``last.ckpt`` every N steps, at every
  epoch end, and when training stops on an exception or signal (SIGTERM: Lightning stops after
  the current batch and calls ``on_exception``).
- :class:`ResumableDataLoader`: the train loader Lightning can resume in the middle of an epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to ``<name>.part`` beside it, syncs it to disk, then ``os.replace``\\ s.

    Lightning's own save goes through a temporary file under ``/tmp`` and ``shutil.move``, which
    copies (non-atomically) when ``/tmp`` and the run dir are on different file systems, as on
    most clusters. Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: every ``every_n_train_steps`` optimizer steps, at the end of every epoch and
    when training stops on an exception or SIGTERM (pre-emption), so that ``resume=true`` loses
    at most one interval.

    Never during validation, nor after the last batch of an epoch before the epoch ends: resumed
    from there, Lightning would score a partial epoch, or skip the epoch's validation.
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

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if (
            self.save_last_on_exception
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.fast_dev_run
            and not trainer.validating  # also excludes the sanity check
            and not _last_batch_of_epoch(trainer)
            and self._last_global_step_saved != trainer.global_step  # 0 before the first step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _last_batch_of_epoch(trainer: L.Trainer) -> bool:
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with the ``state_dict``/``load_state_dict`` interface that Lightning uses
    to resume a loader in the middle of an epoch (as ``torchdata``'s ``StatefulDataLoader``).

    Lightning stores :meth:`state_dict` (the batches yielded so far this epoch) in the
    checkpoint; after :meth:`load_state_dict`, the next epoch starts by skipping that many
    batches. The order itself must be a function of the epoch (``LengthGroupedSampler`` is seeded
    with ``seed + epoch``). The workers' base seed is drawn from the loader's own ``generator``,
    so that starting an epoch does not draw from the global RNG (dropout).
    """

    _batches_yielded = 0
    _batches_to_skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._batches_yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._batches_to_skip = int(state_dict["batches_yielded"])

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing runs before the first batch is asked for, i.e. after Lightning
        # has called the sampler's set_epoch for the (resumed) epoch
        skip, self._batches_to_skip = self._batches_to_skip, 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches, None)
        self._batches_yielded = skip
        for batch in batches:
            self._batches_yielded += 1
            yield batch


def resumable(loader: DataLoader, seed: int = 0) -> DataLoader:
    """``loader`` as a :class:`ResumableDataLoader` (same dataset, sampler, collate function and
    workers); returned unchanged when it already has ``state_dict``/``load_state_dict``."""
    if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
        return loader
    batching: dict[str, Any] = (
        {"batch_sampler": loader.batch_sampler}
        if loader.batch_size is None
        else {
            "batch_size": loader.batch_size,
            "sampler": loader.sampler,
            "drop_last": loader.drop_last,
        }
    )
    return ResumableDataLoader(
        loader.dataset,
        **batching,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator or torch.Generator().manual_seed(seed),
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
