"""A real full disk: a small tmpfs mounted under the test's directory, filled up to ``room``
bytes. Mounting needs root (CAP_SYS_ADMIN); elsewhere the tests that need it are skipped, and
those of :mod:`tests.core.test_full_disk` marked ``patched`` raise ``ENOSPC`` from the writer
instead.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: The size of each tmpfs: enough for the tiny model's files, never for a real model.
SIZE = "16m"


def _mount(directory: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def fill(directory: Path, room: int) -> None:
    """Fill the disk of ``directory`` until ``room`` bytes (rounded to pages) are left."""
    (directory / ".filler").unlink(missing_ok=True)
    free = free_bytes(directory)
    if free > room:
        with open(directory / ".filler", "wb") as file:
            file.write(b"\0" * (free - room))


def free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def small_disks(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """For a fixture: ``small_disk(room)``, a directory on its own tmpfs with ``room`` bytes left
    (the test is skipped where a tmpfs cannot be mounted); unmounted afterwards."""
    mounted: list[Path] = []

    def _make(room: int) -> Path:
        directory = tmp_path / f"disk{len(mounted)}"
        directory.mkdir()
        if not _mount(directory):
            directory.rmdir()
            pytest.skip("cannot mount a tmpfs here (needs root); see the patched tests")
        mounted.append(directory)
        fill(directory, room)
        return directory

    yield _make
    for directory in mounted:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
