"""Run an entry point that kills itself (SIGKILL, as the OOM killer or a pre-emption without grace
would) at a chosen point of its work:

    python -m tests.faults FAULT qa_lightning.train [overrides]

``FAULT`` is a key of :data:`FAULTS`. The kill comes from a patched function, so that it lands at
the same point on every machine, however fast.
"""

from __future__ import annotations

import importlib
import io
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import Any


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before(call: int, when: Callable[..., bool] = lambda *a, **k: True):
    """Wrap a function so that its ``call``-th call (among those where ``when`` holds) kills."""

    def wrap(original: Callable) -> Callable:
        calls = 0

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            if when(*args, **kwargs):
                calls += 1
                if calls == call:
                    die()
            return original(*args, **kwargs)

        return wrapper

    return wrap


def kill_after(call: int):
    """Wrap a function so that its ``call``-th call completes, then kills."""

    def wrap(original: Callable) -> Callable:
        calls = 0

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            result = original(*args, **kwargs)
            calls += 1
            if calls == call:
                die()
            return result

        return wrapper

    return wrap


def kill_halfway_through_save(call: int):
    """Wrap ``torch.save`` so that its ``call``-th call writes half the file, then kills."""

    def wrap(original: Callable) -> Callable:
        calls = 0

        def wrapper(obj: Any, file: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls != call:
                return original(obj, file, *args, **kwargs)
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            file.write(data[: len(data) // 2])
            file.flush()
            die()

        return wrapper

    return wrap


def _replacing(name: str) -> Callable[..., bool]:
    return lambda src, dst, *a, **k: os.fspath(dst).endswith(name)


#: name -> (module, attribute path, wrapper): where each fault strikes.
FAULTS: dict[str, tuple[str, str, Callable]] = {
    # while tokenising the first examples into windows (before anything is cached)
    "tokenise": ("qa_lightning.data.datamodule", "_map_windows", kill_before(1)),
    # after the first cache entry's Arrow files are written, before it is complete
    "cache": ("datasets", "Dataset.save_to_disk", kill_after(1)),
    # halfway through writing the second checkpoint (the best one, at the end of epoch 0)
    "checkpoint": ("torch", "save", kill_halfway_through_save(2)),
    # after the exported weights are written, before the export is complete
    "export": ("transformers", "PreTrainedModel.save_pretrained", kill_after(1)),
    # when metrics.json, written in full beside the target, is about to replace it
    "metrics": ("os", "replace", kill_before(1, _replacing("metrics.json"))),
}


def install(fault: str) -> None:
    module_name, path, wrapper = FAULTS[fault]
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    setattr(owner, name, wrapper(getattr(owner, name)))


def main() -> None:
    fault, module, *args = sys.argv[1:]
    install(fault)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
