"""One directory per run, its state, and ``latest``: :class:`RunDir`, a Hydra callback
(``conf/hydra/default.yaml``) of every entry point.

Before Hydra writes into a run dir (``.hydra/``, the log file), :class:`RunDir`

- claims it. A timestamped dir (``${now:...}`` in ``hydra.run.dir`` or ``hydra.sweep.dir``, as by
  default) that exists already, another run having started in the same second, becomes the
  first free ``<dir>_1``, ``<dir>_2`` ... (``mkdir`` is atomic: two runs never get the same one).
  A named dir that holds a run is refused (exit 2), unless ``resume=true`` continues that run;
- checks the room on its disk: a probe of :data:`PROBE_BYTES`, removed again. A full disk is
  exit 2 with one paragraph, nothing written (Hydra's own error would be a traceback);
- writes :data:`STATUS_FILE`: ``running``, then ``finished`` or ``failed`` (with the error) as the
  job ends. A job that ends the process (the entry points' exit 2 on a user error, Lightning's
  stop on SIGTERM, Ctrl-C) is marked ``failed`` as the process exits; only a process killed
  outright (SIGKILL, a power cut) leaves ``running``, with its ``pid`` and ``host``;
- after a run (not a sweep's job) that finished, points :data:`LATEST` beside the run dir at it
  (``outputs/train/latest``): a relative symlink, replaced by a rename.

Ranks > 0 of a distributed run write into rank 0's run dir and leave all this to rank 0.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from qa_lightning.core.errors import ConfigError, QAError, ResourceError
from qa_lightning.core.integrity import free_space, is_disk_full, write_atomic

log = logging.getLogger(__name__)

#: Room that Hydra's files (config, overrides, log) need, with margin.
PROBE_BYTES = 256 * 1024
#: A run dir's state: ``{"status": "running" | "finished" | "failed", "started", "ended",
#: "pid", "host", "error"}``.
STATUS_FILE = "status.json"
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
#: The link beside the run dirs to the last run that finished.
LATEST = "latest"
#: Files that only a run leaves in a directory: a named run dir holding one is not reused.
RUN_FILES = (STATUS_FILE, ".hydra", "metrics.json")
#: Environment variables holding a process's rank in a distributed run (torchrun, Lightning's
#: DDP launcher, SLURM, LSF); a rank > 0 writes into rank 0's run dir.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_TIMESTAMP = re.compile(r"\$\{\s*now\s*:")


#: Run dirs of this process whose job has not ended: marked failed if the process exits first.
_unfinished: dict[Path, dict[str, Any]] = {}
#: Why this process is about to end a run (see :func:`record_failure`).
_failure: list[str] = []


def is_main_process() -> bool:
    """Not a rank > 0 of a distributed run."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def read_status(directory: Path) -> dict[str, Any] | None:
    """The run dir's :data:`STATUS_FILE`, or ``None`` when it has none (or it is unreadable)."""
    try:
        status = json.loads((directory / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(
    directory: Path, status: str, *, exclusive: bool = False, **details: Any
) -> dict[str, Any]:
    """Write the run dir's :data:`STATUS_FILE`, whole (``exclusive``: only if it has none, else
    ``FileExistsError``: the claim of a named run dir). Returns what was written."""
    content = {"status": status, **details}
    text = json.dumps(content, indent=1) + "\n"
    path = directory / STATUS_FILE
    if exclusive:
        with open(path, "x") as file:
            file.write(text)
    else:
        write_atomic(path, text)
    return content


def new_dir(directory: Path) -> Path:
    """Create ``directory``, or where it exists the first of ``<directory>_1``, ``_2`` ... that
    does not: ``mkdir`` fails on an existing directory, so no two callers get the same one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    for number in range(10_000):
        candidate = directory.with_name(f"{directory.name}_{number}") if number else directory
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"'{directory}' and its 10,000 numbered neighbours exist; remove old runs.")


def refusal(directory: Path, key: str, resumable: bool, what: str = "run") -> ConfigError:
    """A named directory that already holds a run (or sweep), which a new one would overwrite."""
    status = (read_status(directory) or {}).get("status")
    held = f"a {what} ({status})" if status else f"a {what}"
    fixes = "give a new directory (" + key + "=DIR, or leave it out for a new timestamped one)"
    if resumable:
        fixes = f"continue that {what} with resume=true, or {fixes}"
    return ConfigError(
        f"{key}='{directory}' already holds {held}, whose files a new {what} would overwrite: "
        f"{fixes}."
    )


def nothing_to_resume(directory: Path) -> ConfigError:
    """``resume=true`` in a run whose ``hydra.run.dir`` is left to the time: a new directory,
    nothing to continue. (A sweep's jobs may: a requeued SLURM job runs again in its dir.)"""
    latest = directory.parent / LATEST
    hint = ""
    if latest.is_symlink() and latest.is_dir():
        hint = (
            f" (hydra.run.dir={directory.parent / os.readlink(latest)} is the last that finished)"
        )
    return ConfigError(
        "resume=true continues the run in hydra.run.dir, but hydra.run.dir is not given: a new "
        "timestamped directory holds nothing to continue. Name the run to continue: "
        f"hydra.run.dir=DIR resume=true{hint}."
    )


def is_timestamped(node: DictConfig, key: str) -> bool:
    """Whether ``node[key]`` is made of the time (``${now:...}``): a new value each second."""
    return bool(_TIMESTAMP.search(str(OmegaConf.to_container(node, resolve=False)[key])))


def claim_dir(
    directory: Path,
    *,
    timestamped: bool,
    resume: bool | None,
    key: str = "hydra.run.dir",
    taken: tuple[str, ...] = RUN_FILES,
    what: str = "run",
) -> tuple[Path, bool]:
    """The directory a run (or sweep) writes to, and whether it was created for it.

    ``timestamped``: ``directory`` or a free ``<directory>_N`` (:func:`new_dir`). Otherwise
    ``directory`` itself, unless it holds a run (one of the files ``taken``) and ``resume`` is
    not true (``None``: the entry point cannot resume): :class:`ConfigError`."""
    if timestamped:
        return new_dir(directory), True
    if not resume and any((directory / name).exists() for name in taken):
        raise refusal(directory, key, resume is not None, what)
    return directory, not directory.exists()


def disk_full_problem(directory: Path) -> str | None:
    """Why ``directory`` has no room for :data:`PROBE_BYTES`, or ``None``; other errors (a
    directory that cannot be created) are left to Hydra, whose message names them."""
    probe = directory / f".qa_lightning-space-probe.{os.getpid()}"
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(b"\0" * PROBE_BYTES)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        if not is_disk_full(error):
            return None
        probe.unlink(missing_ok=True)
        if created and directory.is_dir():
            directory.rmdir()  # empty: nothing of the run is left
        return no_room(directory, error)
    finally:
        probe.unlink(missing_ok=True)
    return None


def no_room(directory: Path, error: BaseException) -> str:
    """The paragraph for a full disk where the run dir was to be."""
    return (
        f"no space left on the disk of '{directory}' ({free_space(directory)}) for the run's "
        f"config and log files ({type(error).__name__}: {error}); nothing was written. Free "
        "disk space, or write the run to a disk with room (hydra.run.dir=DIR, "
        "hydra.sweep.dir=DIR for a multirun)."
    )


def check_room(directory: Path, created: bool) -> None:
    """Check the room on the claimed ``directory``'s disk; a full disk removes it again if it was
    ``created`` (empty) and raises :class:`ResourceError`."""
    if problem := disk_full_problem(directory):
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise ResourceError(problem)


def start_run(config: DictConfig) -> Path:
    """Claim ``hydra.run.dir`` (:func:`claim_dir`), check its disk and mark it ``running``."""
    resume = bool(config.resume) if "resume" in config else None
    timestamped = is_timestamped(config.hydra.run, "dir")
    if timestamped and resume:
        raise nothing_to_resume(Path(str(config.hydra.run.dir)))
    directory, created = claim_dir(
        Path(str(config.hydra.run.dir)), timestamped=timestamped, resume=resume
    )
    check_room(directory, created)
    try:
        write_status(directory, RUNNING, exclusive=not resume, **_process())
    except FileExistsError:  # another run claimed it after our look
        raise refusal(directory, "hydra.run.dir", resume is not None) from None
    return directory


def start_sweep(config: DictConfig) -> Path:
    """Claim ``hydra.sweep.dir`` (:func:`claim_dir`; Hydra's ``multirun.yaml`` marks a sweep)
    and check its disk."""
    directory, created = claim_dir(
        Path(str(config.hydra.sweep.dir)),
        timestamped=is_timestamped(config.hydra.sweep, "dir"),
        resume=bool(config.resume) if "resume" in config else None,
        key="hydra.sweep.dir",
        taken=("multirun.yaml",),
        what="sweep",
    )
    check_room(directory, created)
    return directory


def point_latest(run_dir: Path) -> Path | None:
    """Point ``<run_dir's parent>/latest`` at ``run_dir``: a relative symlink, created aside and
    renamed over the old one, so that ``latest`` is always whole. Returns the link, or ``None``
    where there is none to make (``run_dir`` named ``latest``, or holding the working
    directory) or it cannot be made (a warning)."""
    run_dir = Path(os.path.abspath(run_dir))
    link = run_dir.parent / LATEST
    if run_dir.name == LATEST or Path.cwd().is_relative_to(run_dir):
        return None
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        temporary.unlink(missing_ok=True)
        os.symlink(run_dir.name, temporary, target_is_directory=True)
        os.replace(temporary, link)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        log.warning("could not point %s at the run dir %s (%s)", link, run_dir, error)
        return None
    return link


def end_run(run_dir: Path, status: str, latest: bool = False, error: str | None = None) -> None:
    """Mark ``run_dir`` ``finished`` or ``failed`` (``error``: why); a finished run with
    ``latest`` becomes :data:`LATEST`. A status that cannot be written is a warning."""
    details = _unfinished.pop(run_dir, None) or _process()
    details["ended"] = _now()
    if error:
        details["error"] = error
    try:
        write_status(run_dir, status, **details)
    except (OSError, QAError) as failure:
        log.warning("could not mark the run dir %s as %s: %s", run_dir, status, failure)
        return
    if latest and status == FINISHED:
        point_latest(run_dir)


def _mark_unfinished_runs_failed() -> None:
    """At exit: a job that did not end (``sys.exit``, ``KeyboardInterrupt``) failed, with the
    error :func:`record_failure` noted."""
    for run_dir in list(_unfinished):
        error = _failure[-1] if _failure else "the process exited before the run ended"
        if run_dir.is_dir():
            end_run(run_dir, FAILED, error=error)
        _unfinished.pop(run_dir, None)


def record_failure(message: str) -> None:
    """Note why this process ends its run before the job returns (the entry points' exit 2 on a
    user error: Hydra's job runner does not see a ``SystemExit``), for the run's status."""
    _failure.append(" ".join(message.split()))


atexit.register(_mark_unfinished_runs_failed)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _process() -> dict[str, Any]:
    return {"started": _now(), "pid": os.getpid(), "host": socket.gethostname()}


def _error_line(job_return: JobReturn) -> str:
    try:
        job_return.return_value  # noqa: B018 (raises the job's exception)
    except Exception as error:
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return "failed"


def _exit_with(error: QAError) -> NoReturn:
    """The entry points' way (:func:`qa_lightning.cli.report_errors`), outside their reach."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


def _claim_or_exit(start: Any, config: DictConfig, where: Path) -> Path:
    """``start(config)`` (:func:`start_run` or :func:`start_sweep`); a refusal or a full disk
    at ``where`` is the entry points' exit 2 with one paragraph."""
    try:
        return start(config)
    except QAError as error:
        _exit_with(error)
    except OSError as error:
        if not is_disk_full(error):
            raise
        _exit_with(ResourceError(no_room(where, error)))


class RunDir(Callback):
    """Hydra callback: one run dir per run, its :data:`STATUS_FILE` and :data:`LATEST` (see
    the module's docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process():
            return
        directory = _claim_or_exit(start_run, config, Path(str(config.hydra.run.dir)))
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(directory)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process():
            return
        resolved = Path(str(config.hydra.sweep.dir))
        directory = _claim_or_exit(start_sweep, config, resolved)
        if directory != resolved:
            # each job's config is composed anew from the sweep's hydra overrides
            quoted = str(directory).replace("'", "\\'")
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweep.dir = str(directory)
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{quoted}'")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process():
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        details = _process()
        if config.hydra.mode == RunMode.RUN:
            details["started"] = (read_status(run_dir) or details)["started"]
        _unfinished[run_dir] = details
        _failure.clear()
        try:
            write_status(run_dir, RUNNING, **details)
        except (OSError, QAError) as failure:
            log.warning("could not mark the run dir %s as running: %s", run_dir, failure)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_main_process():
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.COMPLETED:
            end_run(run_dir, FINISHED, latest=config.hydra.mode == RunMode.RUN)
        else:
            end_run(run_dir, FAILED, error=_error_line(job_return))
