"""Nothing read back is trusted blindly: atomic files and directories, manifests, the window
cache, checkpoints that cannot run code (``trust_checkpoint``), tokenizers that fit their model,
exports checked when loaded, full disks while training."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qa_lightning.answers.settings import SETTINGS_FILE, InferenceSettings
from qa_lightning.core.config import minilm_path
from qa_lightning.core.errors import ConfigError, ExportError, ResourceError
from qa_lightning.core.integrity import (
    file_manifest,
    manifest_problems,
    remove_stale_staging,
    staged_directory,
    write_atomic,
)
from qa_lightning.core.plain import plain
from qa_lightning.core.tokenizer import TOKENIZER_FILES, tokenizer_misfit
from qa_lightning.data.cache import MANIFEST, cached
from qa_lightning.evaluate import evaluate
from qa_lightning.export import export
from qa_lightning.runs import sweep_report
from qa_lightning.runs.callbacks import numpy_rng_states, plain_rng_states
from qa_lightning.runs.checkpoint_reading import load_checkpoint_file, trust_setting
from qa_lightning.serving.answerer import QuestionAnswerer
from qa_lightning.serving.exports import export_checked_onnx, save_hf
from qa_lightning.train import train
from tests.conftest import EVAL_OVERRIDES, TINY_OVERRIDES, run_cli


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- atomic files and directories ----------------------------------------------------------------


def test_write_atomic_writes_whole_or_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_atomic(path, "old")

    def killed_halfway(file) -> None:
        file.write(b"ha")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(path, killed_halfway)
    assert path.read_text() == "old"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert names(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_write_atomic_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, monkeypatch, code):
    path = tmp_path / "metrics.json"
    write_atomic(path, "old")

    def full(fd: int) -> None:
        raise OSError(code, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ResourceError) as error:
        write_atomic(path, "new")
    message = str(error.value)
    assert f"no space left on the disk of '{tmp_path}'" in message
    assert f"while writing '{path}'" in message
    assert "the previous 'metrics.json' is kept intact" in message
    with pytest.raises(ResourceError, match="no partial 'other.json' was left"):
        write_atomic(tmp_path / "other.json", "new")
    assert names(tmp_path) == ["metrics.json"]
    assert path.read_text() == "old"


def test_staged_directory_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "export"
    with pytest.raises(RuntimeError), staged_directory(target) as staging:
        (staging / "a").write_text("1")
        raise RuntimeError("killed")
    assert names(tmp_path) == []

    with staged_directory(target) as staging:
        (staging / "a").write_text("1")
    assert names(target) == ["a"]
    # an earlier directory is replaced whole, files it alone had included
    with staged_directory(target) as staging:
        (staging / "b").write_text("2")
    assert names(target) == ["b"]
    # replace=False (the window cache): what another process completed first is kept
    with staged_directory(target, replace=False) as staging:
        (staging / "c").write_text("3")
    assert names(target) == ["b"]
    assert names(tmp_path) == ["export"]  # no staging or swapped-out directory left


def test_debris_of_killed_processes_is_removed_and_nothing_else(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    host = socket.gethostname()
    debris = tmp_path / f".export.part-{host}-{finished.pid}-x1"
    swapped = tmp_path / f".export.old-{host}-{finished.pid}-x2"
    running = tmp_path / f".export.part-{host}-{os.getppid()}-x3"  # a live process's
    elsewhere = tmp_path / f".export.part-another-host-{finished.pid}-x4"
    for directory in (debris, swapped, running, elsewhere):
        directory.mkdir()
    assert sorted(remove_stale_staging(tmp_path / "export")) == sorted([debris, swapped])
    assert names(tmp_path) == sorted([running.name, elsewhere.name])


def test_manifest_finds_missing_cut_and_altered_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    (tmp_path / "sub" / "b").write_bytes(b"xy")
    manifest = file_manifest(tmp_path)
    assert manifest == {
        "a.bin": {"size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()},
        "sub/b": {"size": 2, "sha256": hashlib.sha256(b"xy").hexdigest()},
    }
    assert manifest_problems(tmp_path, manifest) == []
    (tmp_path / "a.bin").write_bytes(b"01234")
    assert manifest_problems(tmp_path, manifest) == ["'a.bin' has 5 bytes, 10 were written"]
    (tmp_path / "a.bin").write_bytes(b"0123456780")
    (tmp_path / "sub" / "b").unlink()
    assert manifest_problems(tmp_path, manifest) == [
        "'a.bin' does not have the content written (SHA-256 differs)",
        "'sub/b' is missing",
    ]


# -- window cache --------------------------------------------------------------------------------

ROWS = {"input_ids": [[101, 7, 8, 102], [101, 9, 102]], "length": [4, 3]}


@pytest.fixture
def build():
    """A window builder that counts its calls."""

    def _build() -> datasets.Dataset:
        _build.calls += 1
        return datasets.Dataset.from_dict(ROWS)

    _build.calls = 0
    return _build


def test_the_cache_reloads_what_it_wrote(tmp_path: Path, build) -> None:
    cached(tmp_path, "key", build)
    again = cached(tmp_path, "key", build)
    assert build.calls == 1
    assert again.to_dict() == ROWS
    manifest = json.loads((tmp_path / "key" / MANIFEST).read_text())
    assert any(name.endswith(".arrow") for name in manifest)
    assert manifest_problems(tmp_path / "key", manifest) == []
    assert names(tmp_path) == ["key"]


def _cut_arrow_file(entry: Path) -> str:
    arrow = next(entry.glob("*.arrow"))
    size = arrow.stat().st_size
    os.truncate(arrow, size // 2)
    return f"'{arrow.name}' has {size // 2} bytes, {size} were written"


def _alter_arrow_file(entry: Path) -> str:
    arrow = next(entry.glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    return f"'{arrow.name}' does not have the content written (SHA-256 differs)"


def _remove_manifest(entry: Path) -> str:
    (entry / MANIFEST).unlink()
    return f"no {MANIFEST}"


def _unloadable(entry: Path) -> str:
    """Damage that the manifest does not see (it is rewritten to match): loading fails."""
    (entry / "state.json").write_text("{")
    (entry / MANIFEST).write_text(json.dumps(file_manifest(entry, exclude=(MANIFEST,))))
    return "it does not load"


@pytest.mark.parametrize(
    "damage", [_cut_arrow_file, _alter_arrow_file, _remove_manifest, _unloadable]
)
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, build, caplog, damage) -> None:
    entry = tmp_path / "key"
    cached(tmp_path, "key", build)
    problem = damage(entry)
    with caplog.at_level(logging.WARNING, logger="qa_lightning.data.cache"):
        windows = cached(tmp_path, "key", build)
    assert build.calls == 2  # rebuilt, never used
    assert windows.to_dict() == ROWS
    assert f"the window cache entry '{entry}' is damaged ({problem}" in caplog.text
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest_problems(entry, manifest) == []
    assert names(tmp_path) == ["key"]


# -- checkpoints ---------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling this creates ``path``: what a crafted checkpoint could do (or worse)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, caplog) -> None:
    created = tmp_path / "created-by-unpickling"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": CreatesFile(created)}, crafted)
    with pytest.raises(ConfigError) as error:
        load_checkpoint_file(crafted)
    assert str(error.value).startswith(
        f"ckpt_path='{crafted}' can only be loaded with Python's full unpickler, which runs any "
        "code stored in the file (Unsupported global: GLOBAL io.open)."
    )
    assert "add trust_checkpoint=true" in str(error.value)
    assert not created.exists()
    legacy = tmp_path / "legacy.ckpt"  # a bare pickle, not torch.save's format
    legacy.write_bytes(pickle.dumps({"state_dict": {}, "payload": CreatesFile(created)}))
    with pytest.raises(ConfigError, match="legacy.ckpt' is not a readable PyTorch checkpoint"):
        load_checkpoint_file(legacy)
    assert not created.exists()
    # the payload is live: the full unpickler, which trust_checkpoint=true opts into, runs it
    with caplog.at_level(logging.WARNING, logger="qa_lightning.runs.checkpoint_writing"):
        checkpoint, weights_only = load_checkpoint_file(crafted, trust=True)
    checkpoint["payload"].close()
    assert created.exists() and weights_only is False
    assert f"trust_checkpoint=true: loading '{crafted}' with Python's full unpickler" in caplog.text


def test_cli_evaluate_refuses_a_crafted_checkpoint_and_creates_nothing(tmp_path: Path) -> None:
    created = tmp_path / "created-by-unpickling"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": CreatesFile(created)}, crafted)
    result = run_cli(
        "qa_lightning.evaluate",
        f"ckpt_path={crafted}",
        *EVAL_OVERRIDES,
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"error: ckpt_path='{crafted}' can only be loaded with Python's full unpickler" in (
        result.stderr
    )
    assert not created.exists()


def test_damaged_checkpoints_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, path)
    assert torch.equal(load_checkpoint_file(path)[0]["state_dict"]["w"], torch.arange(4096.0))
    data = bytearray(path.read_bytes())
    altered = tmp_path / "altered.ckpt"
    offset = data.index(torch.arange(4096.0).numpy().tobytes()[400:416])
    data[offset] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"ckpt_path='.*altered.ckpt' is damaged \(BadZipFile"):
        load_checkpoint_file(altered)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ConfigError, match=r"cut.ckpt' is not a readable PyTorch checkpoint"):
        load_checkpoint_file(cut)


def test_trust_checkpoint_must_be_a_boolean() -> None:
    assert trust_setting(OmegaConf.create({})) is False
    assert trust_setting(OmegaConf.create({"trust_checkpoint": True})) is True
    with pytest.raises(ConfigError, match="invalid config: trust_checkpoint='yes'"):
        trust_setting(OmegaConf.create({"trust_checkpoint": "yes"}))


def test_plain_values_load_with_weights_only(tmp_path: Path) -> None:
    value = {
        "overrides": OmegaConf.create({"num_hidden_layers": 2, "sizes": [1, 2]}),
        "path": Path("/data/x"),
        "f1": np.float64(51.5),
        "steps": (np.int64(3), [np.int32(4)]),
    }
    expected = {
        "overrides": {"num_hidden_layers": 2, "sizes": [1, 2]},
        "path": "/data/x",
        "f1": 51.5,
        "steps": (3, [4]),
    }
    assert plain(value) == expected
    torch.save(plain(value), tmp_path / "plain.pt")
    assert torch.load(tmp_path / "plain.pt", weights_only=True) == expected


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path: Path) -> None:
    from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

    np.random.seed(7)
    np.random.rand(3)
    states = _collect_rng_states()
    expected = np.random.rand(5)
    torch.save(plain_rng_states(states), tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    np.random.seed(0)
    _set_rng_states(numpy_rng_states(loaded))
    assert np.array_equal(np.random.rand(5), expected)
    _set_rng_states(numpy_rng_states(states))  # an earlier version's NumPy arrays pass unchanged
    assert np.array_equal(np.random.rand(5), expected)


# -- tokenizers ----------------------------------------------------------------------------------


def test_tokenizer_misfits(tokenizer) -> None:
    assert len(tokenizer) == 30522
    assert tokenizer_misfit(tokenizer, 30522) is None
    assert tokenizer_misfit(tokenizer, 30528) is None  # embedding rows rounded up to 64s
    assert tokenizer_misfit(tokenizer, 30000) == (
        "it has 30522 tokens, more than the model's vocab_size=30000: token ids >= 30000 have "
        "no embedding"
    )
    assert tokenizer_misfit(tokenizer, 40000) == (
        "it has 30522 tokens but the model's vocab_size is 40000"
    )


def test_a_tokenizer_without_the_special_tokens_of_windowing_misfits(tmp_path: Path) -> None:
    from qa_lightning.core.tokenizer import load_tokenizer

    no_pad = load_tokenizer(minilm_path())
    no_pad.pad_token = None
    assert no_pad.pad_token is None
    assert tokenizer_misfit(no_pad, 30522) == "it has no pad_token, which windowing needs"


@pytest.fixture(scope="module")
def without_tokenizer(model_dir: Path, tmp_path_factory) -> Path:
    """``model_dir`` without its tokenizer files (and so without a manifest to compare with: a
    hand-made copy): transformers 5 builds a tokenizer of the 5 special tokens for it."""
    directory = tmp_path_factory.mktemp("copy") / "hf_model"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, directory / name)
    return directory


def test_the_export_lists_its_files_in_its_settings(model_dir: Path) -> None:
    saved = json.loads((model_dir / SETTINGS_FILE).read_text())
    assert set(saved["files"]) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert manifest_problems(model_dir, saved["files"]) == []
    assert InferenceSettings.from_dir(model_dir) == InferenceSettings(max_length=128, stride=32)


def test_a_model_dir_without_tokenizer_files_is_refused_everywhere(
    without_tokenizer, compose_train, tmp_path
) -> None:
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(without_tokenizer)) == 5  # the garbage
    expected = (
        f"the tokenizer of '{without_tokenizer}' does not fit the model of "
        f"'{without_tokenizer}': it has 5 tokens but the model's vocab_size is 30522. "
        f"'{without_tokenizer}' holds no tokenizer file ({', '.join(TOKENIZER_FILES)})"
    )
    with pytest.raises(ConfigError) as error:
        QuestionAnswerer.from_model_dir(without_tokenizer, device="cpu", precision="32-true")
    assert expected in str(error.value)
    eval_cfg = compose_train([*EVAL_OVERRIDES, f"model_dir={without_tokenizer}"], "eval")
    with pytest.raises(ConfigError, match="it has 5 tokens but the model's vocab_size is 30522"):
        evaluate(eval_cfg)
    export_cfg = compose_train([f"model_dir={without_tokenizer}", "format=onnx"], "export")
    with pytest.raises(ConfigError, match="it has 5 tokens but the model's vocab_size is 30522"):
        export(export_cfg)
    train_cfg = compose_train(
        [
            *TINY_OVERRIDES,
            f"model.name_or_path={without_tokenizer}",
            "model.from_scratch=false",
            "model.config_overrides=null",
        ]
    )
    with pytest.raises(ConfigError, match="it has 5 tokens but the model's vocab_size is 30522"):
        train(train_cfg)
    assert not (tmp_path / "cache").exists()  # refused before any work
    assert not (tmp_path / "run").exists()


def test_cli_predict_with_a_model_dir_without_tokenizer_files_exits_2(
    without_tokenizer, tmp_path
) -> None:
    result = run_cli(
        "qa_lightning.predict",
        f"model_dir={without_tokenizer}",
        "question=Who wrote it?",
        "context=The committee wrote it.",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'predict'}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: the tokenizer of '{without_tokenizer}' does not fit the model" in result.stderr
    assert "holds no tokenizer file" in result.stderr


def test_a_damaged_export_names_the_file_and_the_fix(model_dir: Path, compose_train, tmp_path):
    damaged = tmp_path / "hf_model"
    shutil.copytree(model_dir, damaged)
    weights = damaged / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 100)
    expected = (
        f"the model directory '{damaged}' is damaged or incomplete: 'model.safetensors' has "
        f"{size - 100} bytes, {size} were written"
    )
    with pytest.raises(ConfigError) as error:
        QuestionAnswerer.from_model_dir(damaged, device="cpu", precision="32-true")
    assert expected in str(error.value)
    assert "python -m qa_lightning.export" in str(error.value)
    with pytest.raises(ConfigError, match="is damaged or incomplete"):
        evaluate(compose_train([*EVAL_OVERRIDES, f"model_dir={damaged}"], "eval"))
    (damaged / SETTINGS_FILE).write_text('{"max_length": 12')
    with pytest.raises(ConfigError, match=f"'{damaged / SETTINGS_FILE}' is damaged"):
        QuestionAnswerer.from_model_dir(damaged, device="cpu", precision="32-true")


def test_an_export_replaces_only_an_earlier_export(model_dir: Path, tmp_path: Path) -> None:
    from qa_lightning.runs.checkpoint_reading import load_model_dir

    exported = load_model_dir(model_dir)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files but no earlier export"):
        save_hf(exported, other)
    assert names(other) == ["todo.txt"]
    again = save_hf(exported, tmp_path / "hf")
    assert save_hf(exported, again) == again  # an earlier export is replaced
    assert "model.safetensors" in names(again)


def test_an_onnx_export_that_fails_its_check_writes_nothing(model_dir: Path, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from qa_lightning.runs.checkpoint_reading import load_model_dir

    with pytest.raises(ExportError, match="more than atol=-1.0; nothing was written"):
        export_checked_onnx(load_model_dir(model_dir), tmp_path / "onnx", atol=-1.0)
    assert names(tmp_path) == []


# -- sweep dirs ----------------------------------------------------------------------------------


def test_report_names_the_damaged_files_of_a_run(tmp_path: Path) -> None:
    run = tmp_path / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_bytes(b"\xff\xfe- model.lr=1e-5\n")
    (run / "metrics.json").write_text(json.dumps({"best": {"f1": 50.0, "em": 40.0, "epoch": 1}}))
    (row,) = sweep_report.summarize(tmp_path)
    assert row["status"] == "ok" and row["f1"] == 50.0
    assert row["error"] == "unreadable .hydra/overrides.yaml (UnicodeDecodeError)"
    (run / ".hydra" / "overrides.yaml").write_text("model.lr: 1e-5\n")  # not a list
    (row,) = sweep_report.summarize(tmp_path)
    assert row["error"] == ".hydra/overrides.yaml is not a list"


# -- a full disk while training --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_while_writing_tensorboard_events_is_a_clear_error(
    compose_train, monkeypatch
) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    cfg = compose_train([*TINY_OVERRIDES, "callbacks.last_checkpoint.every_n_train_steps=1"])
    run_dir = Path(cfg.paths.output_dir)
    write = RecordWriter.write

    def full_after_the_first_checkpoint(self, data) -> None:
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise OSError(errno.ENOSPC, "No space left on device", "events.out.tfevents")
        write(self, data)

    monkeypatch.setattr(RecordWriter, "write", full_after_the_first_checkpoint)
    with pytest.raises(ResourceError) as error:
        train(cfg)
    message = str(error.value)
    assert f"no space left on the disk of '{run_dir.parent}'" in message
    assert "while writing the run's logs (TensorBoard events ...)" in message
    assert "No space left on device: 'events.out.tfevents'" in message
    assert f"continue with resume=true hydra.run.dir={run_dir}" in message
    assert not (run_dir / "metrics.json").exists()


def test_a_full_disk_while_writing_metrics_json_leaves_nothing_and_resumes(
    compose_train, monkeypatch
) -> None:
    fsync = os.fsync

    def full_for_metrics(fd: int) -> None:
        if "metrics.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell metrics.json's file descriptor")
    monkeypatch.setattr(os, "fsync", full_for_metrics)
    cfg = compose_train(TINY_OVERRIDES)
    run_dir = Path(cfg.paths.output_dir)
    with pytest.raises(ResourceError) as error:
        train(cfg)
    message = str(error.value)
    assert f"while writing '{run_dir / 'metrics.json'}'" in message
    assert "no partial 'metrics.json' was left" in message
    assert f"then finish the run with resume=true hydra.run.dir={run_dir}" in message
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.rglob("*.part"))
    monkeypatch.undo()

    metrics = train(compose_train([*TINY_OVERRIDES, "resume=true"]))
    assert (metrics["epochs"], metrics["global_step"]) == (1, 5)
    assert metrics["final"] == {"em": metrics["best"]["em"], "f1": metrics["best"]["f1"]}
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
