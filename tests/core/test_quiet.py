"""Quiet output: a command prints the project's own lines and progress bars, not the notes,
tips and progress bars of the libraries underneath, unless ``verbose=true``; an error once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

#: What the libraries print in a short training run of the tiny model, each line a
#: user can do nothing about: Lightning's notes and tip, its deprecation warning and its
#: logging-interval warning, datasets' and transformers' bars of their own bookkeeping.
LIBRARY_LINES = (
    "Seed set to 42",
    "GPU available:",
    "Trainer already configured with model summary callbacks",
    "Tip: For seamless cloud logging",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "is smaller than the logging interval",
    "Flattening the indices",
    "Saving the dataset",
    "Writing model shards",
    "`Trainer.fit` stopped",
)
#: The project's own lines and bars, and the model summary its callbacks config asks for.
OWN_LINES = (
    "tokenising 70 train questions",
    "windowing train examples: 100%",
    "Trainable params",
    "Epoch 0: 100%",
    "best val/f1",
)


def train_tiny(tmp_path: Path, *overrides: str) -> str:
    """Standard output and error of a one-epoch run of the tiny model on the demo data, with
    a cache of its own (the windows are made, not loaded)."""
    result = run_cli(
        "qa_lightning.train",
        "experiment=demo",
        "model=tiny",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def test_a_run_prints_only_its_own_lines_and_bars(tmp_path: Path) -> None:
    output = train_tiny(tmp_path)
    assert [line for line in LIBRARY_LINES if line in output] == []
    assert [line for line in OWN_LINES if line not in output] == []


@pytest.mark.slow
def test_verbose_brings_the_library_lines_back(tmp_path: Path) -> None:
    output = train_tiny(tmp_path, "verbose=true")
    assert [line for line in LIBRARY_LINES if line not in output] == []
    assert [line for line in OWN_LINES if line not in output] == []


def test_an_error_is_printed_once_and_kept_in_the_log_file(tmp_path: Path) -> None:
    result = run_cli("qa_lightning.export", "format=bogus", f"hydra.run.dir={tmp_path}")
    message = "invalid config: format='bogus'; use one of ['hf', 'onnx']."
    assert result.returncode == 2
    assert (result.stdout + result.stderr).count(message) == 1
    assert result.stderr.strip() == f"error: {message}"
    assert (tmp_path / "export.log").read_text().count(message) == 1
