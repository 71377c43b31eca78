"""Quiet output: a command prints the project's own lines, its progress bars and the warnings a
user can act on, not the notes, tips and progress bars of the libraries it runs on.

Every entry point calls :func:`quiet_libraries` at start, unless ``verbose=true``; a process
that loads a model on its own (a server's worker) calls it too. What it turns off stays off for
the rest of the process. transformers' and datasets' switches import them: the server's
processes leave out those they never use (its main process both, about 100 MiB shared with the
processes forked from it; a worker datasets, about 60 MiB).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

#: Python warnings that tell the user nothing to act on: (message pattern, category).
NOISE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch deprecated LeafSpec, which Lightning's own pytree helpers still use
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # few batches an epoch (the demo): steps are still logged every log_every_n_steps, across
    # epochs, and the epoch's mean loss at its end
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
)
#: Loggers of other libraries that show WARNING and above only: Lightning's notes (devices,
#: seed, precision, tips, why ``fit`` stopped) and matplotlib's (categorical axes).
WARNINGS_ONLY = ("lightning.pytorch", "lightning.fabric", "matplotlib")
#: Lightning's loggers whose INFO lines stay: the model summary of ``callbacks.model_summary``,
#: and "Received SIGTERM" (a pre-empted run stops after its batch and saves ``last.ckpt``).
KEPT_INFO = (
    "lightning.pytorch.callbacks.model_summary",
    "lightning.pytorch.trainer.connectors.signal_connector",
)
#: Lightning's rank-zero notes that stay: which checkpoint a resumed run continues.
KEPT_NOTES = ("Restoring states from the checkpoint", "Restored all states from the checkpoint")
#: Lightning's logger of rank-zero notes (each of its packages names it when imported).
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
#: datasets' progress bars of its own bookkeeping (the windowing bar, ``Dataset.map``'s with
#: the project's description, stays).
DATASETS_BARS = ("Flattening the indices", "Saving the dataset", "Loading dataset from disk")


class DropRecords(logging.Filter):
    """A logger filter that drops the records for which ``drop(record)`` is true."""

    def __init__(self, drop: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.drop(record)


#: Lightning's rank-zero INFO notes, but for :data:`KEPT_NOTES`.
LIGHTNING_NOTES = DropRecords(
    lambda r: r.levelno < logging.WARNING and not r.getMessage().startswith(KEPT_NOTES)
)
#: transformers' load report (a table of missing and unexpected weights after every
#: ``from_pretrained``; fine-tuning a base model always misses the new QA head's).
LOAD_REPORT = DropRecords(lambda r: "LOAD REPORT" in r.getMessage())
#: The libraries whose own switches :func:`quiet_libraries` sets (importing each to do so).
LIBRARIES = ("transformers", "datasets")


def quiet_libraries(verbose: bool = False, libraries: Collection[str] = LIBRARIES) -> None:
    """Other libraries' notes, tips and progress bars off; ``verbose``: leave them as they are.

    Call after importing the libraries (Lightning and transformers set their loggers' levels
    when first imported). Python warnings of :data:`NOISE_WARNINGS` are ignored; loggers of
    :data:`WARNINGS_ONLY` show warnings only (but :data:`KEPT_INFO` and :data:`KEPT_NOTES`);
    transformers' progress bars (loading and writing weights) and load report, datasets' bars
    of :data:`DATASETS_BARS` and onnxruntime's graph-optimiser notes are off; of
    :data:`LIBRARIES`, only those named in ``libraries``.
    """
    if verbose:
        return
    for message, category in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in (*WARNINGS_ONLY, *onnxruntime_optimizer_loggers()):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in (*KEPT_INFO, *RANK_ZERO_LOGGERS):
        logging.getLogger(name).setLevel(logging.INFO)
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(LIGHTNING_NOTES)
    if "transformers" in libraries:
        _quiet_transformers()
    if "datasets" in libraries:
        _quiet_datasets()


def onnxruntime_optimizer_loggers() -> list[str]:
    """The loggers of onnxruntime's transformer graph optimiser, which logs each fusion at INFO
    under its modules' bare names (``onnx_model``, ``fusion_base``, ...: its folder is put on
    ``sys.path``); none without onnxruntime."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return []
    folder = Path(spec.origin).parent / "transformers"
    return sorted(
        path.stem
        for path in folder.glob("*.py")
        if path.stem.startswith(("onnx_model", "fusion_", "optimizer"))
    )


def _quiet_transformers() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("transformers.modeling_utils").addFilter(LOAD_REPORT)


def _quiet_datasets() -> None:
    """datasets turns its progress bars on and off only all together, and one of them is the
    project's (windowing): its module-level bar class is replaced by one that leaves out the
    bars of :data:`DATASETS_BARS`."""
    from datasets import arrow_dataset

    if not getattr(arrow_dataset.hf_tqdm, "leaves_out_bookkeeping", False):
        arrow_dataset.hf_tqdm = _bars_without_bookkeeping(arrow_dataset.hf_tqdm)


def _bars_without_bookkeeping(bar_class: type) -> type:
    """``bar_class`` (datasets' tqdm), disabled for descriptions of :data:`DATASETS_BARS`."""

    class BarsWithoutBookkeeping(bar_class):
        leaves_out_bookkeeping = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if str(kwargs.get("desc") or "").startswith(DATASETS_BARS):
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return BarsWithoutBookkeeping
