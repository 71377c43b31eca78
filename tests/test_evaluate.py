"""Evaluation: a checkpoint, or its exported Hugging Face directory, scores as in training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qa_lightning.core.errors import ConfigError
from qa_lightning.evaluate import evaluate
from qa_lightning.train import train
from tests.conftest import EVAL_OVERRIDES, TINY_OVERRIDES


def test_evaluate_reproduces_the_training_scores_exactly(
    compose_train, compose_eval, tmp_path: Path
) -> None:
    metrics = train(compose_train(TINY_OVERRIDES))
    run_dir = tmp_path / "run"
    train_predictions = json.loads((run_dir / "predictions.json").read_text())
    assert metrics["hf_model"] == str(run_dir / "hf_model")

    for name, source in (
        ("checkpoint", f"ckpt_path={metrics['best_checkpoint']}"),
        ("model_dir", f"model_dir={metrics['hf_model']}"),
    ):
        scores = evaluate(compose_eval([*EVAL_OVERRIDES, source], name))
        # exact equality: same windows, batches, model, decoding and metric code
        assert scores["f1"] == metrics["best"]["f1"], name
        assert scores["em"] == metrics["best"]["em"], name
        assert scores["questions"] == 30
        assert scores["source_type"] == name
        out = tmp_path / "eval" / name
        assert json.loads((out / "metrics.json").read_text()) == scores
        assert json.loads((out / "predictions.json").read_text()) == train_predictions
        assert (out / "config_resolved.yaml").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "give exactly one of model_dir=PATH"),
        (["ckpt_path=a.ckpt", "model_dir=b"], "give exactly one of model_dir=PATH"),
        (["ckpt_path=/nonexistent.ckpt", "data=demo"], "ckpt_path='/nonexistent.ckpt' does not"),
        (["model_dir=/nonexistent"], "model_dir='/nonexistent' is not a directory"),
        (["model_dir=MODEL"], "no validation data: choose them with data=..., e.g. data=demo"),
        (["model_dir=MODEL", "data=local"], "no validation data: set data.validation_file=PATH"),
        (["model_dir=MODEL", "data=demo", "data.stride=400"], "data.stride=400"),
    ],
)
def test_config_errors_come_before_any_work(compose_eval, tmp_path, overrides, message) -> None:
    model_dir = tmp_path / "hf_model"  # the layout of a model directory; nothing is loaded
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    overrides = [o.replace("MODEL", str(model_dir)) for o in overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate(compose_eval(overrides))


def test_a_file_that_is_no_checkpoint_is_a_clear_error(compose_eval, tmp_path: Path) -> None:
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ConfigError, match="is not a readable PyTorch checkpoint"):
        evaluate(compose_eval([f"ckpt_path={not_a_checkpoint}", "data=demo"]))
