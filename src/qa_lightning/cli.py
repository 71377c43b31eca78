"""Shared behaviour of the entry points: clear one-paragraph errors instead of tracebacks, and
the results a run writes."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from qa_lightning.core.errors import QAError, ResourceError
from qa_lightning.core.integrity import disk_full_cause, free_space, is_disk_full, write_atomic

T = TypeVar("T")
#: The entry points' Hydra configs: the repository's ``conf/``, which the build installs as the
#: package ``qa_lightning.conf`` (in a wheel and in an editable install alike).
CONFIG_PATH = "pkg://qa_lightning.conf"
log = logging.getLogger("qa_lightning")

#: Causes of a failed ``hydra.utils.instantiate`` that come from the config (a key the target
#: does not take, a value it rejects, a ``_target_`` that does not exist), not from a bug.
CONFIG_CAUSES: tuple[type[BaseException], ...] = (TypeError, ValueError, ImportError)


def report_errors(task: Callable[[], T]) -> T:
    """Run ``task``; on bad input print a one-paragraph message and exit with status 2.

    Bad input is a :class:`QAError`, a config that OmegaConf cannot resolve, or a config that
    Hydra cannot instantiate (see :func:`user_error`). Anything else is a bug and keeps its
    traceback. ``HYDRA_FULL_ERROR=1`` lets the full traceback through in every case.
    """
    quiet_full_log_files()
    try:
        return task()
    except Exception as error:
        message = user_error(error)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def quiet_full_log_files() -> None:
    """A log file (Hydra's ``<task>.log``) on a full disk: one warning line on standard error,
    then that file is no longer written, instead of ``logging``'s traceback for every record.
    The console keeps the log; the writer that fails next reports the full disk (exit 2)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and "handleError" not in vars(handler):
            handler.handleError = partial(_log_file_error, handler, handler.handleError)


def _log_file_error(
    handler: logging.FileHandler, handle_error: Callable, record: logging.LogRecord
) -> None:
    error = sys.exc_info()[1]
    if not is_disk_full(error):
        handle_error(record)
        return
    handler.setLevel(logging.CRITICAL + 1)  # nothing more to this file
    path = Path(handler.baseFilename)
    print(
        f"warning: no space left on the disk of '{path.parent}' ({free_space(path.parent)}) "
        f"for the log file '{path}'; it is no longer written (the console shows the log).",
        file=sys.stderr,
    )


def user_error(error: BaseException) -> str | None:
    """The one-paragraph message for an error caused by the user's input, else ``None``."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, QAError):
        return one_paragraph(str(error))
    if full := disk_full_cause(error):
        return one_paragraph(str(disk_full_anywhere(full)))
    cause = error.__cause__
    if isinstance(error, InstantiationException | OmegaConfBaseException) and (
        qa_error := _qa_error_in_chain(error)
    ):
        return one_paragraph(str(qa_error))  # raised by a target's __init__ or by a resolver
    if isinstance(error, InstantiationException) and (
        cause is None or isinstance(cause, CONFIG_CAUSES) or _is_misconfiguration(cause)
    ):
        found = re.search(r"full_key: (\S+)", str(error))
        key = found.group(1) if found else "the config"
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
        detail = detail.strip().rstrip(".")
        return one_paragraph(
            f"invalid config under {key}: {detail}. Fix or remove the offending {key}.* "
            "override; add --cfg job to the command to print the composed config."
        )
    if isinstance(error, OmegaConfBaseException):
        return one_paragraph(
            f"invalid config: {str(error).strip().rstrip('.')}. Fix the value named by full_key; "
            "add --cfg job to the command to print the composed config."
        )
    return None


def disk_full_anywhere(error: BaseException) -> ResourceError:
    """A full disk that no writer translated (see :func:`~qa_lightning.integrity.writing`): the
    file the system named, else the working directory, with its free space."""
    path = Path(error.filename) if getattr(error, "filename", None) else None
    where = path.parent if path is not None else Path.cwd()
    return ResourceError(
        f"no space left on the disk of '{where}' ({free_space(where)})"
        + (f" while writing '{path}'" if path is not None else "")
        + f" ({type(error).__name__}: {error}). Free disk space, or write to a disk with room "
        "(hydra.run.dir=DIR, paths.cache_dir=DIR), and run again."
    )


def _qa_error_in_chain(error: BaseException) -> QAError | None:
    """The :class:`QAError` that ``error`` was raised from, if any: OmegaConf re-raises a
    resolver's error as the context (not the cause) of its own, once per interpolation level."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, QAError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _is_misconfiguration(error: BaseException) -> bool:
    """Lightning's ``MisconfigurationException`` (e.g. ``trainer.accelerator=gpu`` on a CPU)."""
    return type(error).__name__ == "MisconfigurationException"


def one_paragraph(text: str) -> str:
    """``text`` on one line: line breaks and runs of white space become single spaces."""
    return " ".join(text.split())


def is_out_of_memory(error: BaseException) -> bool:
    """GPU or CPU memory exhausted (``torch.OutOfMemoryError``, ``MemoryError``, or a
    ``RuntimeError`` saying so, as the CPU allocator and some CUDA libraries raise)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text
        for marker in ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")
    )


@contextmanager
def explain_out_of_memory(
    doing: str,
    settings: Mapping[str, Any],
    advice: str,
    note: Callable[[], str] = lambda: "",
) -> Iterator[None]:
    """Running out of memory (see :func:`is_out_of_memory`) inside the block becomes a
    :class:`ResourceError` naming the settings that decide how much memory ``doing`` takes,
    with their current values, then ``advice`` and ``note()`` (worked out after the failure)."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        first = str(error).strip().splitlines()
        current = ", ".join(f"{key}={value}" for key, value in settings.items())
        extra = note()
        raise ResourceError(
            f"out of memory while {doing} ({type(error).__name__}: {first[0] if first else ''}). "
            f"These settings decide the memory needed: {current}; {advice}"
            + (f" {extra}" if extra else "")
        ) from error


def write_results(
    output_dir: Path,
    predictions: Mapping[str, str],
    metrics: Mapping[str, Any],
    write: Callable[[Path, str], Any] = write_atomic,
) -> None:
    """A run's ``predictions.json`` (question id -> answer), then its ``metrics.json``: a run dir
    with ``metrics.json`` is complete. Each is written whole (``write``: see
    :func:`~qa_lightning.core.integrity.write_atomic`)."""
    write(output_dir / "predictions.json", json.dumps(predictions, indent=1, ensure_ascii=False))
    write(output_dir / "metrics.json", json.dumps(metrics, indent=2))
