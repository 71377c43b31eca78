"""What each of the server's processes imports: the main process (and the HTTP and manager
processes forked from it) neither torch nor the model; the inference workers torch and
transformers, not Lightning, datasets or torchmetrics (memory: docs/serving.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("litserve", reason="needs the serve extra")

HEAVY = ("torch", "transformers", "lightning", "datasets", "torchmetrics", "onnxruntime")


def imported_after(code: str) -> dict[str, bool]:
    """Which of :data:`HEAVY` a fresh interpreter has imported after running ``code``."""
    script = (
        f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_main_and_http_processes_import_no_torch() -> None:
    """What ``python -m qa_lightning.serve`` imports before it starts the server: the entry
    point, the server, the model keys and the settings it checks, and its quiet output."""
    found = imported_after(
        "import qa_lightning.serve, qa_lightning.serving.server, qa_lightning.cli\n"
        "from qa_lightning.serving.model_keys import given_model\n"
        "from qa_lightning.answers.settings import InferenceSettings\n"
        "qa_lightning.cli.quiet_output({}, libraries=())"
    )
    assert not any(found.values()), found


def test_a_worker_answers_without_lightning(tiny_model_dir) -> None:
    found = imported_after(
        "from qa_lightning.serving.server import ModelSource, WorkerLogging\n"
        "WorkerLogging().apply()\n"  # a worker's logging and quiet output
        f"source = ModelSource(backend='torch', device='cpu', model_dir={str(tiny_model_dir)!r})\n"
        "source.load('cpu').answer(['Who?'], ['Bob went home.'], 1)"
    )
    assert found["torch"] and found["transformers"], found
    assert not (found["lightning"] or found["datasets"] or found["torchmetrics"]), found
