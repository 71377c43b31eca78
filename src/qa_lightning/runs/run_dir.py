"""Room on the disk of the run dir, checked before Hydra writes into it.

Hydra writes ``.hydra/*.yaml`` and the job's log file before the task starts, outside the entry
points' :func:`~qa_lightning.cli.report_errors`: a full disk there used to end in Hydra's own
traceback (exit 1). :class:`RunDirSpace` (a Hydra callback, ``conf/hydra/default.yaml``) writes
a probe of :data:`PROBE_BYTES` into the run dir (or sweep dir) first; when the disk is full it
prints the project's one-paragraph error and exits with status 2, having written nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qa_lightning.core.integrity import free_space, is_disk_full

#: Room that Hydra's files (config, overrides, log) need, with margin.
PROBE_BYTES = 256 * 1024


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
        if created:
            directory.rmdir()  # empty: nothing of the run is left
        return (
            f"no space left on the disk of '{directory}' ({free_space(directory)}) for the run's "
            f"config and log files ({type(error).__name__}: {error}); nothing was written. Free "
            "disk space, or write the run to a disk with room (hydra.run.dir=DIR, "
            "hydra.sweep.dir=DIR for a multirun)."
        )
    finally:
        probe.unlink(missing_ok=True)
    return None


class RunDirSpace(Callback):
    """Exit with status 2 and one paragraph before a run (or sweep) starts on a full disk."""

    def _check(self, directory: Any) -> None:
        if problem := disk_full_problem(Path(str(directory))):
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)
