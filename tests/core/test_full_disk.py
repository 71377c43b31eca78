"""A full disk at each place the project writes (docs/integrity.md, "Every writer on a full
disk"): the project's one-paragraph error naming the path and the space left, nothing
half-written left behind, earlier good files untouched.

The disk is a real one: a small tmpfs (:mod:`tests.full_disk`), skipped where it cannot be
mounted; the ``patched`` tests raise ``ENOSPC`` from inside the writer instead and run anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import torch

from qa_lightning import report
from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.cli import user_error, write_results
from qa_lightning.core.errors import ResourceError
from qa_lightning.core.integrity import is_disk_full, write_atomic
from qa_lightning.data.cache import cached
from qa_lightning.runs.checkpoint_reading import Exported
from qa_lightning.runs.checkpoint_writing import AtomicCheckpointIO
from qa_lightning.serving.jsonl import QuestionLine, write_answers
from tests.conftest import TINY_OVERRIDES, run_cli, save_tiny_model_dir
from tests.full_disk import fill, small_disks

SETTINGS = InferenceSettings(max_length=128, stride=32)
#: Windows of about 1 MiB: more than the room left on the small disks below.
BIG_WINDOWS = {"input_ids": [list(range(512))] * 512, "length": [512] * 512}


@pytest.fixture
def small_disk(tmp_path: Path):
    yield from small_disks(tmp_path)


def left_behind(directory: Path) -> list[str]:
    """What is in ``directory`` besides the filler and what was there before."""
    return sorted(p.name for p in directory.iterdir() if p.name != ".filler")


def assert_clear(error: pytest.ExceptionInfo, path: Path, what: str = "") -> str:
    message = str(error.value)
    assert message.startswith(f"no space left on the disk of '{path.parent}' (")
    assert "MiB free" in message
    assert f"while writing {what + ' ' if what else ''}'{path}'" in message
    assert "\n" not in message
    return message


# -- window cache and teacher logits cache -------------------------------------------------------


def test_window_cache_on_a_full_disk_leaves_nothing_and_keeps_earlier_entries(small_disk):
    disk = small_disk(8 << 20)
    cached(disk, "earlier", lambda: datasets.Dataset.from_dict({"length": [1, 2]}))
    fill(disk, 64 << 10)
    with pytest.raises(ResourceError) as error:
        cached(disk, "new", lambda: datasets.Dataset.from_dict(BIG_WINDOWS))
    message = assert_clear(error, disk / "new", "the window cache entry")
    assert "paths.cache_dir=DIR" in message
    assert left_behind(disk) == ["earlier"]
    assert cached(disk, "earlier", pytest.fail)["length"] == [1, 2]


def test_window_cache_with_a_patched_full_disk(tmp_path, monkeypatch):
    """pyarrow's ``OSError`` carries no errno: it is still known as a full disk."""

    def half_written(self, path, **kwargs):
        Path(path, "data-00000-of-00001.arrow").write_bytes(b"ARROW1")
        raise OSError("[Errno 28] Error writing bytes to file. Detail: No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", half_written)
    with pytest.raises(ResourceError) as error:
        cached(tmp_path, "new", lambda: datasets.Dataset.from_dict({"length": [1]}))
    assert_clear(error, tmp_path / "new", "the window cache entry")
    assert left_behind(tmp_path) == []


def test_teacher_logits_cache_on_a_full_disk(small_disk, tmp_path, tokenizer):
    from qa_lightning.runs.teacher import add_teacher_logits

    teacher = save_tiny_model_dir(tmp_path / "teacher", SETTINGS)
    encoded = tokenizer(["Who?"] * 64, ["The committee wrote it. " * 20] * 64)
    windows = datasets.Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    )
    disk = small_disk(16 << 10)
    with pytest.raises(ResourceError) as error:
        add_teacher_logits(windows, teacher, tokenizer.pad_token_id, disk)
    message = str(error.value)
    assert message.startswith(f"no space left on the disk of '{disk}' (")
    assert f"while writing the teacher logits cache entry '{disk}/" in message
    assert left_behind(disk) == []


# -- checkpoints, exports --------------------------------------------------------------------


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(small_disk):
    disk = small_disk(256 << 10)
    last = disk / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, last)
    before = last.read_bytes()
    with pytest.raises(ResourceError, match="the previous 'last.ckpt' is kept intact"):
        AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(1 << 18)}, last)
    assert left_behind(disk) == ["last.ckpt"]
    assert last.read_bytes() == before


@pytest.fixture(scope="module")
def tiny_exported(tmp_path_factory) -> Exported:
    from qa_lightning.runs.checkpoint_reading import load_model_dir

    return load_model_dir(save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "hf", SETTINGS))


def test_hf_export_on_a_full_disk_keeps_the_earlier_export(small_disk, tiny_exported):
    from qa_lightning.serving.exports import save_hf

    disk = small_disk(15 << 20)
    out_dir = save_hf(tiny_exported, disk / "hf_model")
    before = sorted(p.name for p in out_dir.iterdir())
    fill(disk, 1 << 20)
    with pytest.raises(ResourceError) as error:
        save_hf(tiny_exported, out_dir)
    message = assert_clear(error, out_dir, "the export")
    assert "the previous 'hf_model' is kept intact" in message
    assert left_behind(disk) == ["hf_model"]
    assert sorted(p.name for p in out_dir.iterdir()) == before


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "int8"])
def test_onnx_export_on_a_full_disk_leaves_nothing(small_disk, tiny_exported, tmp_path, quantize):
    pytest.importorskip("onnxruntime.quantization")
    from omegaconf import OmegaConf

    from qa_lightning.serving.exports import export_checked_onnx
    from qa_lightning.serving.int8 import QuantizationRecipe, quantize_export

    fp32 = export_checked_onnx(tiny_exported, tmp_path / "fp32")[0]
    support = sum(p.stat().st_size for p in fp32.parent.iterdir()) - fp32.stat().st_size
    # int8: room for the fp32 model and its files, not for the fused copy quantised beside it
    room = support + (fp32.stat().st_size * 5 // 4 if quantize else fp32.stat().st_size // 2)
    disk = small_disk(room)
    cfg = OmegaConf.create({"validation_samples": 3, "min_agreement": 0.9, "atol": 1e-4})
    dynamic = QuantizationRecipe(activations="dynamic")  # nothing to calibrate on
    finish = (lambda path: quantize_export(tiny_exported, path, dynamic, cfg)) if quantize else None
    with pytest.raises(ResourceError) as error:
        export_checked_onnx(tiny_exported, disk / "onnx_model", finish=finish)
    assert_clear(error, disk / "onnx_model", "the export")
    assert left_behind(disk) == []


# -- results: metrics.json, predictions.json, answers, sweep summaries ---------------------------


def test_metrics_and_predictions_on_a_full_disk(small_disk):
    disk = small_disk(8 << 10)
    predictions = {f"q{i}": "an answer of some length " * 4 for i in range(2000)}
    with pytest.raises(ResourceError) as error:
        write_results(disk, predictions, {"final": {"f1": 1.0}})
    assert_clear(error, disk / "predictions.json")
    assert left_behind(disk) == []


class NoAnswers:
    def answer(self, questions, contexts, top_k, progress):
        return [[] for _ in questions]


def test_answers_jsonl_on_a_full_disk(small_disk):
    disk = small_disk(8 << 10)
    questions = [QuestionLine(i + 1, None, "Who? " * 50, "Nobody.") for i in range(200)]
    with pytest.raises(ResourceError) as error:
        write_answers(NoAnswers(), questions, [], disk / "answers.jsonl", progress=False)
    assert_clear(error, disk / "answers.jsonl")
    assert left_behind(disk) == []


def test_sweep_summary_on_a_full_disk_exits_2(small_disk, capsys):
    disk = small_disk(1 << 20)
    for number in range(20):
        run = disk / str(number)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- model.lr={number}e-5\n")
        (run / "metrics.json").write_text(json.dumps({"best": {"f1": number, "em": 1}}))
    fill(disk, 0)
    assert report.main([str(disk)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: no space left on the disk of '{disk}'")
    assert "Traceback" not in stderr
    assert not list(disk.glob("summary*"))
    assert not list(disk.glob("*.part"))


# -- the shared translation ------------------------------------------------------------------


def test_any_full_disk_in_the_chain_is_one_paragraph(tmp_path):
    try:
        try:
            raise OSError(28, "No space left on device", str(tmp_path / "x.bin"))
        except OSError as inner:
            raise RuntimeError("a library wrapped it") from inner
    except RuntimeError as error:
        assert is_disk_full(error)
        message = user_error(error)
    assert message.startswith(f"no space left on the disk of '{tmp_path}' (")
    assert f"while writing '{tmp_path / 'x.bin'}'" in message
    with pytest.raises(ResourceError):
        write_atomic(tmp_path / "y", lambda file: (_ for _ in ()).throw(OSError(28, "full")))


def test_cli_train_with_the_window_cache_on_a_full_disk_exits_2(small_disk, tmp_path):
    disk = small_disk(16 << 10)
    result = run_cli(
        "qa_lightning.train",
        *TINY_OVERRIDES,
        f"paths.cache_dir={disk}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"no space left on the disk of '{disk}'" in line
    assert "while writing the window cache entry" in line
    assert left_behind(disk) == []


# -- the run dir: Hydra's files, the log file, then training's own writers ----------------------


def test_cli_train_with_the_run_dir_on_a_full_disk_exits_2_and_writes_nothing(small_disk):
    disk = small_disk(0)
    result = run_cli("qa_lightning.train", *TINY_OVERRIDES, f"hydra.run.dir={disk / 'run'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: no space left on the disk of '{disk / 'run'}' (")
    assert left_behind(disk) == []


@pytest.mark.slow
def test_cli_train_filling_the_disk_of_its_run_dir_exits_2(small_disk, tmp_path):
    """Room for Hydra's files and the log, not for a checkpoint: one paragraph, one warning for
    the log file at most, no traceback, no partial checkpoint."""
    disk = small_disk(1 << 20)
    run_dir = disk / "run"
    result = run_cli(
        "qa_lightning.train",
        *TINY_OVERRIDES,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: no space left on the disk of '{run_dir}")
    assert not list(run_dir.rglob("*.part"))
    assert not (run_dir / "metrics.json").exists()


def test_a_log_file_on_a_full_disk_warns_once_without_a_traceback(small_disk, capsys):
    import logging

    from qa_lightning.cli import quiet_full_log_files

    disk = small_disk(0)
    handler = logging.FileHandler(disk / "train.log")
    logger = logging.getLogger()
    logger.addHandler(handler)
    try:
        quiet_full_log_files()
        for _ in range(3):
            logger.warning("x" * 10_000)
    finally:
        logger.removeHandler(handler)
        handler.close()
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "Logging error" not in stderr
    assert stderr.count(f"warning: no space left on the disk of '{disk}'") == 1


def test_cli_predict_answers_to_standard_output_on_a_full_disk(small_disk, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    model_dir = save_tiny_model_dir(tmp_path / "hf", SETTINGS)
    questions = tmp_path / "questions.jsonl"
    line = json.dumps({"question": "Who? " * 20, "context": "The committee wrote it. " * 20})
    questions.write_text((line + "\n") * 200)
    disk = small_disk(0)
    with open(disk / "answers.jsonl", "w") as output:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "qa_lightning.predict",
                f"model_dir={model_dir}",
                f"input={questions}",
                "output=-",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
            timeout=600,
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (error,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert error.startswith("error: no space left on the disk of ")
    assert "No space left on device" in error
