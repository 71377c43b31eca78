"""Lightning callbacks of the training run (configured in ``conf/callbacks/default.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from qa_lightning.data.sampling import ResumableDataLoader


class ExactResume(Callback):
    """A run resumed from a checkpoint continues as the uninterrupted run would have.

    Lightning restores weights, optimizer, scheduler, epoch, step and loop progress; this adds
    what it leaves out:

    - the global RNG states (dropout), saved with every checkpoint (NumPy's as a tensor, so that
      the checkpoint loads with ``weights_only=True``), restored when training starts; under DDP
      each rank's (their dropout masks differ in size, so their states do);
    - the position in the epoch: the datamodule's train loader is a
      :class:`~qa_lightning.data.sampling.ResumableDataLoader`, whose state is saved here and
      loaded when Lightning restarts mid-epoch. Lightning 2.6 loads a stateful loader's state
      only if the loader is created after the checkpoint is restored, which
      ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` prevents.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        rng_states = plain_rng_states(_collect_rng_states())
        state = {
            "rng_states": rng_states,
            "epoch": self._trainer.current_epoch if self._trainer else None,
            "train_loaders": [loader.state_dict() for loader in self._train_loaders()],
        }
        world_size = self._trainer.world_size if self._trainer else 1
        if world_size > 1 and torch.distributed.is_initialized():
            # every rank saves a checkpoint's state (rank 0 writes it): a collective
            per_rank: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(per_rank, rng_states)
            state["rng_states_per_rank"] = per_rank
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the sanity check and before the first batch is drawn
        if self._loaded is None:
            return
        loaded, self._loaded = self._loaded, None
        per_rank = loaded.get("rng_states_per_rank")
        if per_rank and len(per_rank) == trainer.world_size:
            _set_rng_states(numpy_rng_states(per_rank[trainer.global_rank]))
        else:
            _set_rng_states(numpy_rng_states(loaded["rng_states"]))
        # the epoch of the checkpoint goes on (the fit loop has already moved past a finished
        # one): skip its batches already trained on
        if trainer.current_epoch == loaded.get("epoch"):
            for loader, state in zip(self._train_loaders(), loaded["train_loaders"], strict=False):
                loader.load_state_dict(state)

    def _train_loaders(self) -> list[ResumableDataLoader]:
        loaders = self._trainer.train_dataloader if self._trainer else None
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, list | tuple):
            loaders = [loaders]
        return [loader for loader in loaders if isinstance(loader, ResumableDataLoader)]


def plain_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """Lightning's RNG states with NumPy's key array as an int64 tensor (all else is tensors,
    tuples, ints and floats already)."""
    if "numpy" not in states:
        return states
    kind, key, *rest = states["numpy"]
    return {**states, "numpy": (kind, torch.from_numpy(np.asarray(key, dtype=np.int64)), *rest)}


def numpy_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`plain_rng_states`; states saved by earlier versions (NumPy arrays)
    pass unchanged."""
    if "numpy" not in states or not isinstance(states["numpy"][1], torch.Tensor):
        return states
    kind, key, *rest = states["numpy"]
    return {**states, "numpy": (kind, key.numpy().astype(np.uint32), *rest)}


class HyperparametersSummary(Callback):
    """When training starts, ``params`` (flattened to ``model.lr``, ``data.stride`` ...) go to
    the loggers: the one place that logs hyperparameters (the module and the data module do not;
    the run dir's ``config_resolved.yaml`` holds the whole config). TensorBoard shows them in its
    HPARAMS tab with the best scores, logged when training ends (``-1`` until then): one row per
    run, to compare the runs of a sweep.
    """

    #: The scores of the HPARAMS tab: ``hp/<name>_best`` from the module's ``best``.
    SCORES = ("f1", "em", "epoch")

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = flatten(params)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # names the scores the tab shows
                logger.log_hyperparams(self.params, {f"hp/{n}_best": -1 for n in self.SCORES})
            else:
                logger.log_hyperparams(self.params)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = getattr(pl_module, "best", None)
        if not best or best.get("epoch", -1) < 0:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                scores = {f"hp/{name}_best": best[name] for name in self.SCORES}
                logger.log_metrics(scores, step=trainer.global_step)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lr": 1e-3}}`` -> ``{"model.lr": 1e-3}``."""
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
