"""SQuAD v2 end to end: unanswerable questions train on CLS and are scored with the v2 metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qa_lightning.data.loading import load_local_file
from qa_lightning.data.windowing import make_train_windows
from qa_lightning.errors import DataError
from qa_lightning.train import train
from tests.conftest import ROOT, TINY_OVERRIDES

V2_FILE = ROOT / "tests" / "fixtures" / "squad_v2_tiny.json"
V2_OVERRIDES = [
    *TINY_OVERRIDES,
    "data=local",
    f"data.train_file={V2_FILE}",
    f"data.validation_file={V2_FILE}",
    "data.version_2_with_negative=true",
    "data.batch_size=4",
]


def test_fixture_has_both_kinds_of_question() -> None:
    examples = load_local_file(V2_FILE)
    unanswerable = [e["id"] for e in examples if not e["answers"]["text"]]
    assert unanswerable == ["v2-004", "v2-005", "v2-009", "v2-013"]
    assert len(examples) == 13


def test_unanswerable_windows_are_labelled_cls(tokenizer) -> None:
    examples = load_local_file(V2_FILE)
    windows = make_train_windows(
        tokenizer, examples["question"][:], examples["context"][:], examples["answers"][:], 384, 128
    )
    for i, answers in enumerate(examples["answers"][:]):
        labels = (windows["start_positions"][i], windows["end_positions"][i])
        assert (labels == (0, 0)) == (not answers["text"])


def test_v1_config_rejects_unanswerable_questions(compose_train) -> None:
    cfg = compose_train([*V2_OVERRIDES, "data.version_2_with_negative=false"])
    with pytest.raises(DataError, match="v2-004: no answer"):
        train(cfg)


@pytest.mark.parametrize(("threshold", "empty"), [(-1e9, 13), (1e9, 0)])
def test_v2_training_logs_v2_metrics_and_threshold_decides(
    compose_train, threshold: float, empty: int
) -> None:
    cfg = compose_train([*V2_OVERRIDES, f"postprocess.null_score_diff_threshold={threshold}"])
    metrics = train(cfg)
    best = metrics["best"]
    for key in ("HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh", "HasAns_total"):
        assert key in best
    assert (best["HasAns_total"], best["NoAns_total"]) == (9.0, 4.0)
    predictions = json.loads((Path(cfg.paths.output_dir) / "predictions.json").read_text())
    assert sum(text == "" for text in predictions.values()) == empty
    if empty == 13:  # every question answered "no answer": only the 4 unanswerable are right
        assert best["f1"] == pytest.approx(400 / 13)
        assert best["NoAns_f1"] == 100.0
