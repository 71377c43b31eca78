"""Checkpoints that survive crashes and pre-emption, and resume training exactly.

- :class:`AtomicCheckpointIO` (``trainer.plugins``): a crash while saving keeps the previous file;
  a full disk is a :class:`~qa_lightning.errors.ResourceError` saying so.
- :class:`LastCheckpoint` (``callbacks.last_checkpoint``): ``last.ckpt`` every N steps, at every
  epoch end, and when training stops on an exception or signal (SIGTERM: Lightning stops after
  the current batch and calls ``on_exception``), except a non-finite loss or a full disk.
- :class:`ResumableDataLoader`: the train loader Lightning can resume in the middle of an epoch.
- :func:`load_checkpoint_file`: a checkpoint read back checked (intact, and loadable with
  ``torch.load(weights_only=True)``, the unpickler that cannot run code, unless the user trusts it).

Checkpoints hold only tensors and plain Python values (dict, list, tuple, str, int, float, bool,
None): hyperparameters are saved as plain containers (:func:`plain`), RNG states as tensors.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from qa_lightning.cli import is_disk_full
from qa_lightning.errors import ConfigError, ResourceError
from qa_lightning.integrity import CHUNK, free_space, write_atomic

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint with :func:`~qa_lightning.integrity.write_atomic` (to
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
    return ResourceError(
        f"no space left on the disk of '{path.parent}' ({free_space(path.parent)}) while saving "
        f"checkpoint '{path}' ({type(error).__name__}: {error}); {kept}. Free disk space, or run "
        "on a disk with room (hydra.run.dir=DIR), keep fewer checkpoints "
        "(callbacks.model_checkpoint.save_top_k=1) or save last.ckpt less often "
        "(callbacks.last_checkpoint.every_n_train_steps=N); then continue with resume=true "
        f"hydra.run.dir={run_dir}."
    )


def plain(value: Any) -> Any:
    """``value`` with OmegaConf containers, paths and NumPy scalars turned into plain Python
    values (dict, list, str, int, float ...), which ``torch.load(weights_only=True)`` reads."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(item) for item in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def trust_setting(cfg: Any) -> bool:
    """The ``trust_checkpoint`` key of an entry point's config (``false`` when absent), checked
    to be a boolean: a misspelt value must not trust a checkpoint."""
    value = cfg.get("trust_checkpoint", False)
    if not isinstance(value, bool):
        raise ConfigError(
            f"invalid config: trust_checkpoint={value!r}; use true (load a checkpoint that needs "
            "Python's full unpickler, which can run code: only for files you trust) or false."
        )
    return value


def load_checkpoint_file(path: str | Path, trust: bool = False) -> tuple[dict[str, Any], bool]:
    """A checkpoint file, memory-mapped and checked, and whether it loaded with
    ``weights_only=True``.

    Damage (a file cut short, or whose CRC-32 checksums do not match) is a :class:`ConfigError`
    naming the file. A checkpoint that the safe unpickler refuses (it holds other objects than
    tensors and plain values: an earlier version's, or a crafted one) is one too, unless
    ``trust``: then it is loaded with Python's full unpickler, which can run code, and a warning
    says so.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path='{path}' does not exist (resolved to '{path.resolve()}'); training runs "
            "keep theirs in <run dir>/checkpoints/."
        )
    damage = _zip_damage(path)
    if damage:
        raise ConfigError(
            f"ckpt_path='{path}' is damaged ({damage}): it was cut short or altered after it was "
            f"written. {_OTHER_CHECKPOINT}"
        )
    mmap = zipfile.is_zipfile(path)  # torch.save's format; older pickles cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), True
    except pickle.UnpicklingError as error:
        reason = _weights_only_refusal(error)
        if reason is None:
            raise _unreadable(path, error) from error
        if not trust:
            raise ConfigError(
                f"ckpt_path='{path}' can only be loaded with Python's full unpickler, which runs "
                f"any code stored in the file ({reason}). Checkpoints written by this version of "
                "qa_lightning load without it; this one is from an earlier version or from "
                "elsewhere. Load it only if you trust where it came from: add "
                "trust_checkpoint=true to the command."
            ) from error
    except Exception as error:  # zip, storage and torch errors come in many types
        raise _unreadable(path, error) from error
    log.warning(
        "trust_checkpoint=true: loading '%s' with Python's full unpickler (%s), which can run "
        "code stored in the file",
        path,
        reason,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap), False
    except Exception as error:
        raise _unreadable(path, error) from error


_OTHER_CHECKPOINT = (
    "Use another checkpoint (the run's checkpoints/best-*.ckpt or last.ckpt), copy it again, or "
    "train again."
)


def _unreadable(path: Path, error: BaseException) -> ConfigError:
    detail = _weights_unpickler_detail(error)
    if detail is None:
        lines = str(error).strip().splitlines()
        detail = lines[0] if lines else ""
    return ConfigError(
        f"ckpt_path='{path}' is not a readable PyTorch checkpoint ({type(error).__name__}: "
        f"{detail}); it may be cut short (an interrupted copy, a full disk) or not be a "
        f"checkpoint at all. {_OTHER_CHECKPOINT}"
    )


def _weights_unpickler_detail(error: BaseException) -> str | None:
    """The reason ``torch.load(weights_only=True)`` gives for refusing a file, if it is one."""
    text = str(error)
    if "WeightsUnpickler error:" not in text:
        return None
    lines = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
    return lines[0].split(" was not an allowed global")[0].strip() if lines else ""


def _weights_only_refusal(error: BaseException) -> str | None:
    """What ``torch.load(weights_only=True)`` refused to create (e.g. ``Unsupported global:
    GLOBAL numpy...``), or ``None`` when ``error`` is something else (a file that is no pickle,
    or a damaged one)."""
    detail = _weights_unpickler_detail(error) or ""
    if any(marker in detail for marker in ("GLOBAL", "allowlisted", "add_safe_globals")):
        return detail
    return None


def _zip_damage(path: Path) -> str | None:
    """The first member of the zip archive ``path`` (``torch.save``'s format) whose content does
    not match its CRC-32, or ``None``. Files that are no zip archive are left to ``torch.load``."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:  # written without a checksum
                    continue
                with archive.open(info) as member:
                    while member.read(CHUNK):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: every ``every_n_train_steps`` optimizer steps, at the end of every epoch and
    when training stops on an exception or SIGTERM (pre-emption), so that ``resume=true`` loses
    at most one interval.

    Not when the exception is a non-finite loss (``FloatingPointError``: the weights have
    diverged and would replace the last good ``last.ckpt``) or a full disk (the save would fail
    again).

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


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with the ``state_dict``/``load_state_dict`` interface that Lightning uses
    to resume a loader in the middle of an epoch (as ``torchdata``'s ``StatefulDataLoader``).

    Lightning stores :meth:`state_dict` (the batches yielded so far this epoch) in the
    checkpoint; after :meth:`load_state_dict`, the next epoch starts by skipping that many
    batches. The order itself must be a function of the epoch (the samplers of
    :mod:`qa_lightning.data.sampling` draw it from ``seed + epoch``); under DDP every rank has
    yielded as many batches and skips as many. The workers' base seed is drawn from the loader's
    own ``generator``, so that starting an epoch does not draw from the global RNG (dropout).
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
