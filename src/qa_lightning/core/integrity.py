"""Files written whole or not at all, and checked when read back.

- :func:`write_atomic`: every file the project writes (``metrics.json``, ``predictions.json``,
  summaries, checkpoints) goes to ``<name>.<pid>.part`` beside it, is synced to disk, then renamed
  over the target; a full disk is a :class:`~qa_lightning.core.errors.ResourceError` and leaves no
  partial file.
- :func:`staged_directory`: directories (window cache entries, exports) are written into a
  hidden sibling and renamed into place when complete.
- :func:`writing`: the one place where a full disk (``ENOSPC``, ``EDQUOT``, also when a library
  such as pyarrow or onnx raised it from deep inside) becomes a
  :class:`~qa_lightning.errors.ResourceError` naming what was written, where, and the free space.
- :func:`file_manifest` / :func:`manifest_problems`: sizes and SHA-256 digests recorded when a
  directory is written, compared when it is read back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from qa_lightning.core.errors import ResourceError

#: What :func:`write_atomic` writes: text (UTF-8), bytes, or a function writing to a binary file.
Content = str | bytes | Callable[[IO[bytes]], Any]
CHUNK = 2**20


def write_atomic(
    path: str | Path,
    content: Content,
    on_disk_full: Callable[[Path, BaseException], Exception] | None = None,
) -> Path:
    """Write ``content`` to ``path`` through ``<name>.<pid>.part`` + fsync + rename.

    A reader sees the previous file or the new one, never a part. A full disk (``ENOSPC``,
    ``EDQUOT``) raises ``on_disk_full(path, error)`` (by default :func:`disk_full_error`), other
    errors propagate; either way the part file is removed.
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with open(partial, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode() if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except Exception as error:
        if is_disk_full(error):
            raise (on_disk_full or disk_full_error)(path, error) from error
        raise
    finally:
        partial.unlink(missing_ok=True)
    return path


#: How a full disk reads in the message of an error raised without an ``errno``: pyarrow's
#: ``OSError``, safetensors' ``SafetensorError`` (Rust's ``os error 28``), onnx's and protobuf's
#: errors carry the C library's message as text.
DISK_FULL_TEXTS = (
    "No space left on device",
    "Disk quota exceeded",
    "[Errno 28]",
    "[Errno 122]",
    "os error 28)",
    "os error 122)",
)


def disk_full_cause(error: BaseException | None) -> BaseException | None:
    """The error saying the disk (or quota) is full that ``error`` is, or was raised from: an
    ``OSError`` with ``ENOSPC``/``EDQUOT``, or any error whose message says so (a library's)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            text in str(error) for text in DISK_FULL_TEXTS
        ):
            return error
        error = error.__cause__ or error.__context__
    return None


def is_disk_full(error: BaseException | None) -> bool:
    """``error``, or an exception it was raised from, says the disk (or quota) is full."""
    return disk_full_cause(error) is not None


def free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


def disk_full_error(
    path: Path, error: BaseException, advice: str = "", what: str = "", kept: str | None = None
) -> ResourceError:
    """A full disk while writing ``path`` (``what``: e.g. ``"the window cache entry"``): the free
    space, what was kept (``kept``; by default whether a previous ``path`` is intact), how to
    make room."""
    path = Path(path)
    if kept is None:
        kept = (
            f"the previous '{path.name}' is kept intact"
            if path.exists()
            else f"no partial '{path.name}' was left"
        )
    cause = disk_full_cause(error) or error
    return ResourceError(
        f"no space left on the disk of '{path.parent}' ({free_space(path.parent)}) while writing "
        f"{what + ' ' if what else ''}'{path}' ({type(cause).__name__}: {cause}); {kept}. Free "
        "disk space, or write to a disk with room (hydra.run.dir=DIR)"
        + (f"; {advice}" if advice else ".")
    )


@contextmanager
def writing(
    path: str | Path,
    what: str = "",
    advice: str | Callable[[], str] = "",
    kept: Callable[[], str] | None = None,
) -> Iterator[None]:
    """A full disk inside the block (see :func:`is_disk_full`: also one that a library raised as
    another error type, or chained) becomes :func:`disk_full_error` for ``path``; other errors,
    and a :class:`ResourceError` raised inside, propagate unchanged.

    By default the block is expected to write ``path`` whole or not at all
    (:func:`write_atomic`, :func:`staged_directory`), so that the message can say the previous
    file is kept or no partial one was left; a block that appends to files in ``path`` (a run's
    logs) says what is kept with ``kept()``. ``advice`` may be worked out after the failure.
    """
    try:
        yield
    except ResourceError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise disk_full_error(
            Path(path),
            error,
            advice() if callable(advice) else advice,
            what,
            kept() if kept else None,
        ) from error


# -- directories -------------------------------------------------------------------------------


def _staging_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{socket.gethostname()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: str | Path) -> list[Path]:
    """Remove the staging (``.part``) and swapped-out (``.old``) siblings of ``target`` left by
    processes of this host that were killed; returns them. Other hosts' are left alone."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("part", "old"):
        prefix = _staging_prefix(target, kind)
        for entry in target.parent.glob(f"{prefix}*"):
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _new_sibling(target: Path, kind: str) -> Path:
    """A new hidden directory beside ``target`` named after this host and process (created
    with the umask's permissions, as ``target`` would be)."""
    while True:
        name = f"{_staging_prefix(target, kind)}{os.getpid()}-{secrets.token_hex(4)}"
        path = target.parent / name
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextmanager
def staged_directory(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty directory beside ``target``; when the block ends without an error it
    becomes ``target``, else it is removed.

    ``target`` is never seen half-written: a new one appears by a rename; an existing one is
    swapped out (renamed away, then deleted) when ``replace``, else kept (another process wrote
    the same content first). Debris of killed processes is removed first
    (:func:`remove_stale_staging`).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = _new_sibling(target, "part")
    try:
        yield staging
        try:
            os.rename(staging, target)  # fails if target exists and is not empty
            return
        except OSError:
            if not target.exists():
                raise
        if not replace:
            return
        old = _new_sibling(target, "old")
        os.replace(target, old / target.name)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- manifests ---------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(directory: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of the files under ``directory``."""
    directory = Path(directory)
    return {
        path.relative_to(directory).as_posix(): {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() not in exclude
    }


def manifest_problems(directory: str | Path, manifest: Mapping[str, Any]) -> list[str]:
    """What differs between the files under ``directory`` and ``manifest`` (missing files, sizes,
    digests); ``[]`` when every listed file is as written. Sizes are compared first, so a cut
    file is found without reading it."""
    directory = Path(directory)
    problems = []
    if not isinstance(manifest, Mapping):
        return ["its manifest is not a JSON object"]
    for name, expected in manifest.items():
        path = directory / name
        if not isinstance(expected, Mapping) or not {"size", "sha256"} <= expected.keys():
            problems.append(f"the manifest entry of '{name}' is malformed")
        elif not path.is_file():
            problems.append(f"'{name}' is missing")
        elif (size := path.stat().st_size) != expected["size"]:
            problems.append(f"'{name}' has {size} bytes, {expected['size']} were written")
        elif file_sha256(path) != expected["sha256"]:
            problems.append(f"'{name}' does not have the content written (SHA-256 differs)")
    return problems
