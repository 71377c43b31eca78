"""Bad configuration gets a one-paragraph error naming the key and the fix, with exit status 2
and no traceback (unless ``HYDRA_FULL_ERROR=1``), before any heavy work.

The helpers here are shared by ``test_errors_*.py``: :func:`run_cli` runs a real entry point in
a subprocess, :func:`cli_error` and :func:`in_process_error` check what the user sees.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qa_lightning.cli import report_errors, user_error
from qa_lightning.core.errors import ConfigError
from qa_lightning.train import train
from tests.conftest import TINY_OVERRIDES, run_cli


@pytest.fixture(autouse=True)
def _short_errors(monkeypatch) -> None:
    """The messages under test are those users see without ``HYDRA_FULL_ERROR``."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def cli_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """The ``error: ...`` line of a failed run: exit ``code``, no traceback, one line holding
    every fragment."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def in_process_error(capsys, task: Callable[[], Any], *fragments: str) -> str:
    """Run ``task`` as the entry points do (:func:`report_errors`); it must exit with status 2
    printing one ``error: ...`` line that holds every fragment."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        report_errors(task)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- real CLI ----------------------------------------------------------------------------------


def test_cli_bad_type_names_the_key_and_hydra_full_error_shows_the_traceback(tmp_path) -> None:
    args = [*TINY_OVERRIDES, "data.batch_size=abc"]
    cli_error(
        run_cli("qa_lightning.train", *args, f"hydra.run.dir={tmp_path / 'run'}"),
        "data.batch_size='abc'",
        "must be an integer",
        "data.batch_size=8",
    )
    full = run_cli(
        "qa_lightning.train", *args, f"hydra.run.dir={tmp_path / 'full'}", HYDRA_FULL_ERROR="1"
    )
    assert full.returncode != 0
    assert "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_cli_unknown_key_names_the_closest_known_key_in_one_line(tmp_path) -> None:
    result = run_cli(
        "qa_lightning.train", *TINY_OVERRIDES, "data.bacth_size=8", f"hydra.run.dir={tmp_path}"
    )
    line = cli_error(result, "unknown config key data.bacth_size in data.bacth_size=8")
    assert "did you mean data.batch_size? (add --cfg job" in line
    assert "+data.bacth_size" not in result.stderr  # Hydra's advice, wrong for a typo
    assert result.stderr.count("\n") == 1 and not result.stdout
    assert not any(tmp_path.iterdir())  # nothing ran


def test_cli_evaluate_rejects_a_stride_the_tokenizer_would_panic_on(model_dir, tmp_path) -> None:
    # 128 - 64 question tokens - 4 special tokens leave 60 context tokens: stride 60 is too large
    result = run_cli(
        "qa_lightning.evaluate",
        f"model_dir={model_dir}",
        "data=demo",
        "data.max_length=128",
        "data.stride=60",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    cli_error(result, "data.stride=60", "data.max_question_tokens=64", "below 60")
    assert "PanicException" not in result.stderr


# -- in process --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.stride=128"], ["data.stride=128", "smaller than data.max_length=128"]),
        (["data.stride=60"], ["data.stride=60", "data.max_question_tokens=64", "below 60"]),
        (["data.max_question_tokens=200"], ["data.max_question_tokens=200", "no room"]),
        (["data.max_length=0"], ["data.max_length=0", "must be > 0"]),
        (["data.max_length=null"], ["data.max_length=None", "set it"]),
        (["data.max_length=1024"], ["data.max_length=1024", "at most 512 tokens"]),
        (["data.batch_size=0"], ["data.batch_size=0", "must be > 0"]),
        (["data.eval_batch_size=-4"], ["data.eval_batch_size=-4"]),
        (["data.batch_size=2.5"], ["data.batch_size=2.5", "must be an integer"]),
        (["data.train_samples=0"], ["data.train_samples=0", "null for all"]),
        (["data.num_workers=-1"], ["data.num_workers=-1", ">= 0"]),
        (["model.lr=0"], ["model.lr=0", "must be > 0"]),
        (["model.lr=-1e-5"], ["model.lr=-1e-05"]),
        (["model.lr=inf"], ["model.lr=inf", "must be finite"]),
        (["model.lr=fast"], ["model.lr='fast'", "must be a number"]),
        (["model.warmup_ratio=1.5"], ["model.warmup_ratio=1.5", "[0, 1)"]),
        (["postprocess.n_best=0"], ["postprocess.n_best=0"]),
        (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "must be > 0"]),
        (["trainer.max_epochs=two"], ["trainer.max_epochs='two'", "must be an integer"]),
        (["+trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches=0"]),
        (["data.on_bad_record=ignore"], ["data.on_bad_record='ignore'", "skip"]),
        (["data.eval_equal_length=auto"], ["data.eval_equal_length='auto'", "or null"]),
        (["data.group_by_length=1"], ["data.group_by_length=1", "true or false"]),
        (["data.train_file=/nonexistent/train.json"], ["'/nonexistent/train.json' does not exist"]),
        (["data.validation_file=TMP"], ["is a directory, not a file"]),
        (["data.train_samples=71"], ["data.train_samples=71", "larger than the 70 questions"]),
        (["data.validation_samples=31"], ["data.validation_samples=31", "the 30 questions"]),
        (
            ["model.name_or_path=no-such-org/no-such-model"],
            ["'no-such-org/no-such-model'", "Check model.name_or_path", "model=minilm"],
        ),
        (["model.name_or_path=TMP"], ["could not load the tokenizer of", "model=tiny"]),
        (["data.max_length=${oops}"], ["invalid config", "oops", "data.max_length"]),
        (["+data.max_lenght=128"], ["under data", "unexpected keyword argument 'max_lenght'"]),
        (["trainer.precision=bogus"], ["under trainer", "Precision 'bogus' is invalid"]),
        (["trainer.devices=0"], ["under trainer", "devices"]),
        (
            ["model.config_overrides.num_attention_heads=3"],
            ["could not load model", "not a multiple of the number of attention heads (3)"],
        ),
        (["ckpt_path=/nonexistent/last.ckpt"], ["ckpt_path='/nonexistent/last.ckpt' does not"]),
    ],
)
def test_invalid_train_config_is_one_paragraph_naming_the_key(
    compose_train, capsys, tmp_path: Path, overrides: list[str], fragments: list[str]
) -> None:
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    cfg = compose_train([*TINY_OVERRIDES, *overrides])
    in_process_error(capsys, lambda: train(cfg), *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_unreadable_last_checkpoint_stops_resume_before_any_work(compose_train, capsys) -> None:
    cfg = compose_train([*TINY_OVERRIDES, "resume=true"])
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"half a checkpoint")
    in_process_error(
        capsys,
        lambda: train(cfg),
        f"ckpt_path='{last}' is not a readable PyTorch checkpoint",
        "Cannot continue from it (resume=true)",
        "best-*.ckpt",
    )
    assert last.read_bytes() == b"half a checkpoint"  # left for the user to inspect


def test_only_user_errors_lose_their_traceback(monkeypatch, capsys) -> None:
    def bug() -> None:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):  # a bug keeps its traceback
        report_errors(bug)
    assert user_error(ConfigError("bad\n  value")) == "bad value"  # one paragraph
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")

    def bad_input() -> None:
        raise ConfigError("invalid config: data.stride=-1")

    with pytest.raises(ConfigError):
        report_errors(bad_input)
    assert capsys.readouterr().err == ""
