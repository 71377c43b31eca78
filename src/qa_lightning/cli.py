"""Shared behaviour of the entry points: clear one-paragraph errors instead of tracebacks, and
the results a run writes."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from difflib import SequenceMatcher
from functools import partial, wraps
from pathlib import Path
from typing import Any, TypeVar

from qa_lightning.core.errors import QAError, ResourceError
from qa_lightning.core.integrity import disk_full_cause, free_space, is_disk_full, write_atomic
from qa_lightning.core.quiet import LIBRARIES, quiet_libraries
from qa_lightning.runs.run_dir import record_failure

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
        print(f"error: {message}", file=sys.stderr)
        log_to_files(logging.ERROR, message)  # the console has it once, from standard error
        record_failure(message)  # the run dir's status.json: failed, with this message
        sys.exit(2)


def log_to_files(level: int, message: str) -> None:
    """``message`` into the log files only (Hydra's ``<task>.log``), not onto the console."""
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


def verbose_output(cfg: Any) -> bool:
    """Whether the entry point's config says ``verbose=true`` or Hydra's ``hydra.verbose`` is
    set: other libraries' notes, tips and progress bars are then left on."""
    from hydra.core.hydra_config import HydraConfig

    hydra_verbose = HydraConfig.initialized() and bool(HydraConfig.get().verbose)
    return bool(cfg.get("verbose")) or hydra_verbose


def quiet_output(cfg: Any, libraries: Collection[str] = LIBRARIES) -> None:
    """Other libraries' notes, tips and progress bars off
    (:func:`~qa_lightning.core.quiet.quiet_libraries`), unless :func:`verbose_output`."""
    quiet_libraries(verbose=verbose_output(cfg), libraries=libraries)


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


def hydra_main(config_name: str) -> Callable[[Callable[[Any], T]], Callable[..., Any]]:
    """``hydra.main`` of an entry point (config ``config_name`` in :data:`CONFIG_PATH`), where an
    override that names a key or a config option that does not exist (``data.bacth_size=8``,
    ``data=sampel``) stops in one line naming the closest known ones, exit 2
    (:func:`override_error`), instead of Hydra's message and exit 1."""
    import hydra

    def decorate(task: Callable[[Any], T]) -> Callable[..., Any]:
        main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
        run = main(task)

        @wraps(run)
        def run_explaining_overrides(*args: Any, **kwargs: Any) -> Any:
            with _override_errors_explained():
                return run(*args, **kwargs)

        return run_explaining_overrides

    return decorate


@contextmanager
def _override_errors_explained() -> Iterator[None]:
    """``hydra.main`` runs each of its steps (composing, running, ``--cfg``) through
    ``hydra._internal.utils.run_and_report``, which prints an error and exits 1: within the block,
    an error there that :func:`override_error` explains is its line, exit 2, instead."""
    from hydra._internal import utils as hydra_utils

    report = hydra_utils.run_and_report
    hydra_utils.run_and_report = lambda func: report(partial(_explain_override_errors, func))
    try:
        yield
    finally:
        hydra_utils.run_and_report = report


def _explain_override_errors(func: Callable[[], T]) -> T:
    from hydra._internal.utils import get_args_parser
    from hydra.errors import ConfigCompositionException

    try:
        return func()
    except ConfigCompositionException as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        overrides = get_args_parser().parse_known_args(sys.argv[1:])[0].overrides
        message = override_error(error, overrides)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def override_error(error: BaseException, overrides: Sequence[str]) -> str | None:
    """The one-line message for a composition error that one of the command line's
    ``overrides`` caused: a key the config does not have (naming the closest keys it has, or
    the config group to choose first) or a config group option that does not exist (naming the
    closest options); ``None`` for other errors."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if isinstance(error, MissingConfigException):
        return _unknown_option(error, parsed)
    cause = error.__cause__
    node = getattr(cause, "parent_node", None)
    failed = str(getattr(cause, "full_key", None) or "")
    if node is None or not failed:
        return None
    override = next(
        (
            o
            for o in parsed
            if not (o.is_add() or o.is_force_add() or o.is_delete())
            and (o.key_or_group == failed or o.key_or_group.startswith(failed + "."))
        ),
        None,
    )
    if override is None:
        return None
    typed, line = override.key_or_group, override.input_line
    every_key = "add --cfg job to the command to print every key"
    head, _, name = failed.rpartition(".")
    if not head and (options := _group_options(name)):
        return (
            f"{line} sets a key of the {name} config, and none is chosen: choose one first, "
            f"{name}=OPTION {line} (the options in {name}: {', '.join(options)})."
        )
    keys = list(_dotted_keys(OmegaConf.to_container(node._get_root(), resolve=False)))
    if not typed.startswith("hydra."):
        keys = [key for key in keys if not key.startswith("hydra.")]
    if close := closest(typed, keys):
        guess = " or ".join(close)
        return f"unknown config key {typed} in {line}: did you mean {guess}? ({every_key})"
    where = head or "the config"
    return f"unknown config key {typed} in {line}: {where} has no key {name} ({every_key})."


def closest(typed: str, known: Sequence[str]) -> list[str]:
    """Up to 3 of the ``known`` keys (or options) closest to ``typed``: the shortest ending in
    ``.typed`` (``batch_size``: ``data.batch_size``), else the most similar (``difflib``)."""
    ending = sorted((key for key in known if key.endswith(f".{typed}")), key=lambda k: k.count("."))
    if ending:
        return [key for key in ending if key.count(".") == ending[0].count(".")][:3]
    ratio = {key: SequenceMatcher(None, typed, key).ratio() for key in known}
    ranked = sorted(ratio, key=lambda key: -ratio[key])
    best = ratio[ranked[0]] if ranked else 0.0
    return [key for key in ranked[:3] if ratio[key] >= max(0.75, best - 0.05)]


def _unknown_option(error: Any, parsed: Sequence[Any]) -> str | None:
    """The message for ``group=option`` with no such option (``data=sampel``)."""
    group, _, option = str(error.missing_cfg_file or "").rpartition("/")
    for override in parsed:
        if override.key_or_group != group:
            continue
        value = override.value()
        if override.is_sweep_override():
            value = list(override.sweep_string_iterator())
        options = list(error.options or _group_options(group))
        if option in map(str, value if isinstance(value, list) else [value]) and options:
            close = closest(option, options)
            given = f"{group}={option}"
            where = f" (in {override.input_line})" if override.input_line != given else ""
            guess = f" did you mean {' or '.join(f'{group}={c}' for c in close)}?" if close else ""
            return f"no config {given}{where}:{guess} The options in {group}: {', '.join(options)}."
    return None


def _group_options(group: str) -> list[str]:
    """The options of the config group ``group`` (``[]`` if there is none) in the search path
    of the Hydra application being composed."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return []
    return GlobalHydra.instance().config_loader().get_group_options(group)


def _dotted_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a nested dict as a dotted path, parents first."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield f"{prefix}{key}"
            yield from _dotted_keys(value, f"{prefix}{key}.")


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
