"""Runs killed (SIGKILL) at points across their life, then started again, finish exactly as an
undisturbed run: same metrics, predictions and exported weights, and no debris left.

The kills come from :mod:`tests.faults` (a patched function kills its own process): while
tokenising into the window cache, after a cache entry's files are written, halfway through
writing a checkpoint, in the middle of the export at the end of training and while
``metrics.json`` is put in place. A damaged window cache entry and a checkpoint of an earlier
version (which needs ``trust_checkpoint=true``) are tested on the way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_OVERRIDES

#: One epoch of the demo's 78 training windows in batches of 16: 5 steps; last.ckpt at step 3.
OVERRIDES = [
    *TINY_OVERRIDES,
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=3",
]
#: What must not depend on the run being interrupted (all of metrics.json but the wall time).
SAME = (
    "final",
    "best",
    "epochs",
    "global_step",
    "train_questions",
    "train_windows",
    "validation_questions",
)
ENV = {
    **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},  # exit 2, no traceback
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_train(
    run_dir: Path, cache: Path, *extra: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    """``python -m qa_lightning.train`` (through :mod:`tests.faults` with ``fault``)."""
    entry = ["-m", "tests.faults", fault] if fault else ["-m"]
    command = [
        sys.executable,
        *entry,
        "qa_lightning.train",
        *OVERRIDES,
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The undisturbed run: its run dir, window cache and metrics."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_train(tmp / "run", tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    return {"run_dir": tmp / "run", "cache": tmp / "cache", "metrics": metrics}


def killed(run_dir: Path, cache: Path, fault: str, *extra: str) -> str:
    """Run with ``fault``; check that it was killed; return its output (logs included)."""
    result = run_train(run_dir, cache, "resume=true", *extra, fault=fault)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()
    return result.stdout + result.stderr


def assert_finishes_as_the_reference(
    run_dir: Path, cache: Path, reference: dict, *extra: str
) -> str:
    """Start the killed run again (``resume=true``); it ends as the reference run did, with no
    partial files or staging directories left. Returns its output (logs included)."""
    result = run_train(run_dir, cache, "resume=true", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in SAME:
        assert metrics[key] == reference["metrics"][key], key
    expected_dir = reference["run_dir"]
    predictions = (run_dir / "predictions.json").read_text()
    assert predictions == (expected_dir / "predictions.json").read_text()
    weights = load_file(run_dir / "hf_model" / "model.safetensors")
    expected = load_file(expected_dir / "hf_model" / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    for directory in (run_dir, cache):
        debris = [p for p in directory.rglob("*") if p.name.endswith(".part") or ".part-" in p.name]
        assert debris == [], debris
    return result.stdout + result.stderr


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def test_killed_while_tokenising_into_the_cache(tmp_path: Path, reference: dict) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    killed(run_dir, cache, "tokenise")
    assert not cache.exists() or entries(cache) == []
    assert_finishes_as_the_reference(run_dir, cache, reference)
    assert len(entries(cache)) == 2  # train and validation windows


@pytest.mark.slow
def test_killed_while_writing_a_cache_entry(tmp_path: Path, reference: dict) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    killed(run_dir, cache, "cache")
    assert entries(cache) == []
    assert [p.name for p in cache.iterdir() if ".part-" in p.name]  # the staged entry, cut off
    assert_finishes_as_the_reference(run_dir, cache, reference)


def test_damaged_cache_and_killed_while_saving_a_checkpoint(tmp_path: Path, reference) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(reference["cache"], cache)
    arrow = max(cache.glob("*/*.arrow"), key=lambda p: p.stat().st_size)
    os.truncate(arrow, arrow.stat().st_size // 2)  # as after an interrupted copy

    output = killed(run_dir, cache, "checkpoint")
    assert f"the window cache entry '{arrow.parent}' is damaged ('{arrow.name}' has" in output
    checkpoints = run_dir / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    assert [p.name for p in checkpoints.glob("best-*.part")]  # the best checkpoint, half written

    output = assert_finishes_as_the_reference(run_dir, cache, reference)
    assert "is damaged" not in output  # the rebuilt entry is used
    assert f"Restoring states from the checkpoint path at {checkpoints / 'last.ckpt'}" in output


@pytest.mark.slow
def test_killed_while_exporting_at_the_end_of_training(tmp_path: Path, reference: dict) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(reference["cache"], cache)
    killed(run_dir, cache, "export")
    assert not (run_dir / "hf_model").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".hf_model.part-")]
    assert_finishes_as_the_reference(run_dir, cache, reference)


@pytest.mark.slow
def test_killed_while_writing_metrics_json(tmp_path: Path, reference: dict) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(reference["cache"], cache)
    killed(run_dir, cache, "metrics")
    assert [p.name for p in run_dir.glob("metrics.json.*.part")]
    assert_finishes_as_the_reference(run_dir, cache, reference)


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_resumes_exactly_when_trusted(
    tmp_path: Path, reference: dict
) -> None:
    """Earlier versions saved NumPy's RNG state as an array, which only Python's full unpickler
    loads: refused without ``trust_checkpoint=true``, and exact with it."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(reference["cache"], cache)
    killed(run_dir, cache, "checkpoint")
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    states = checkpoint["callbacks"]["ExactResume"]["rng_states"]
    kind, key, *rest = states["numpy"]
    states["numpy"] = (kind, key.numpy().astype(np.uint32), *rest)
    torch.save(checkpoint, last)

    refused = run_train(run_dir, cache, "resume=true")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"error: ckpt_path='{last}' can only be loaded with Python's full unpickler" in (
        refused.stderr
    )
    assert "GLOBAL numpy" in refused.stderr and "trust_checkpoint=true" in refused.stderr
    output = assert_finishes_as_the_reference(run_dir, cache, reference, "trust_checkpoint=true")
    assert f"trust_checkpoint=true: loading '{last}' with Python's full unpickler" in output


@pytest.mark.slow
def test_evaluate_scores_a_trusted_checkpoint_of_an_earlier_version_exactly(
    tmp_path: Path, reference: dict
) -> None:
    best = Path(reference["metrics"]["best_checkpoint"])
    earlier = tmp_path / best.name
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["hyper_parameters"]["n_best"] = np.int64(checkpoint["hyper_parameters"]["n_best"])
    torch.save(checkpoint, earlier)
    evaluation = [
        sys.executable,
        "-m",
        "qa_lightning.evaluate",
        f"ckpt_path={earlier}",
        *[o for o in OVERRIDES if o.startswith(("data", "trainer"))],
    ]
    refused = subprocess.run(
        [*evaluation, f"hydra.run.dir={tmp_path / 'refused'}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "GLOBAL numpy" in refused.stderr and "trust_checkpoint=true" in refused.stderr
    trusted = subprocess.run(
        [*evaluation, "trust_checkpoint=true", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (scores["em"], scores["f1"]) == (
        reference["metrics"]["best"]["em"],
        reference["metrics"]["best"]["f1"],
    )
