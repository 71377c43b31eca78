"""SQuAD v2 answers: the null answer ``""`` among a question's candidates, hand-computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qa_lightning.answers.ranking import rank_answers
from qa_lightning.answers.settings import SETTINGS_FILE, InferenceSettings
from qa_lightning.core.errors import ConfigError

CONTEXT = "abcdefghij"
# span (2, 5) "cde" scores 3, (6, 9) "ghi" 1; the null answer 2
SCORES, STARTS, ENDS = np.array([3.0, 1.0]), np.array([2, 6]), np.array([5, 9])


def ranked(threshold: float, n_best: int = 20, null: float | None = 2.0):
    answers = rank_answers(CONTEXT, SCORES, STARTS, ENDS, n_best, 10, null, threshold)
    return [(a.text, a.start, a.end) for a in answers], [a.score for a in answers]


def softmax(values: list[float]) -> np.ndarray:
    return np.exp(values) / np.exp(values).sum()


def test_at_threshold_zero_the_null_answer_ranks_by_its_score() -> None:
    answers, probabilities = ranked(0.0)
    assert answers == [("cde", 2, 5), ("", 0, 0), ("ghi", 6, 9)]
    assert probabilities == pytest.approx(softmax([3.0, 2.0, 1.0]))


@pytest.mark.parametrize(
    ("threshold", "texts"),
    [
        # the null answer (2) beats "cde" (3) when 2 - 3 = -1 is more than the threshold
        (-1.5, ["", "cde", "ghi"]),
        (-1.0, ["cde", "", "ghi"]),  # a tie: the span wins, as evaluation's strict ">"
        (-0.5, ["cde", "", "ghi"]),
        (0.5, ["cde", "", "ghi"]),
        (1.0, ["cde", "ghi", ""]),  # 2 - 1 = 1 is not more than 1: "ghi" first
        (5.0, ["cde", "ghi", ""]),
    ],
)
def test_the_null_answer_beats_the_spans_it_exceeds_by_more_than_the_threshold(
    threshold, texts
) -> None:
    answers, probabilities = ranked(threshold)
    assert [text for text, _, _ in answers] == texts
    # probabilities do not depend on the threshold
    by_text = dict(zip(texts, probabilities, strict=True))
    assert [by_text["cde"], by_text[""], by_text["ghi"]] == pytest.approx(softmax([3.0, 2.0, 1.0]))


def test_the_null_answer_is_kept_outside_the_n_best() -> None:
    answers, probabilities = ranked(0.0, n_best=1)
    assert answers == [("cde", 2, 5), ("", 0, 0)]  # as utils_qa.py adds it back
    assert probabilities == pytest.approx(softmax([3.0, 2.0]))
    answers, probabilities = ranked(0.0, n_best=1, null=4.0)
    assert answers == [("", 0, 0)]  # the null answer took the only place
    assert probabilities == pytest.approx([1.0])


def test_without_a_valid_span_the_answer_is_null_with_probability_one() -> None:
    answers = rank_answers(CONTEXT, np.array([-np.inf]), np.array([0]), np.array([0]), 20, 3, 1.0)
    assert [(a.text, a.score, a.start, a.end) for a in answers] == [("", 1.0, 0, 0)]
    # SQuAD v1.1 (no null score): no answer at all
    assert rank_answers(CONTEXT, np.array([-np.inf]), np.array([0]), np.array([0])) == []


def test_settings_carry_v2_and_the_threshold(tmp_path: Path) -> None:
    settings = InferenceSettings(version_2_with_negative=True, null_score_diff_threshold=-1.25)
    settings.save(tmp_path)
    written = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert written["version_2_with_negative"] is True
    assert written["null_score_diff_threshold"] == -1.25
    assert InferenceSettings.from_dir(tmp_path) == settings
    # an earlier export's file, without them: SQuAD v1.1
    (tmp_path / SETTINGS_FILE).write_text('{"max_length": 256}')
    assert InferenceSettings.from_dir(tmp_path) == InferenceSettings(max_length=256)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("null_score_diff_threshold", "best", "must be a number"),
        ("null_score_diff_threshold", float("nan"), "must be a number"),
        ("null_score_diff_threshold", True, "must be a number"),
        ("version_2_with_negative", 1, "must be true or false"),
    ],
)
def test_invalid_v2_settings_are_clear_errors(field, value, message) -> None:
    with pytest.raises(ConfigError, match=f"invalid setting {field}=.*{message}"):
        InferenceSettings(**{field: value})


def test_predict_takes_v2_settings_from_the_command_line(compose_train, tmp_path: Path) -> None:
    """A v1 model directory answered as v2: ``""`` when the threshold is very low."""
    import torch
    from omegaconf import OmegaConf

    from qa_lightning.core.config import minilm_path
    from qa_lightning.core.tokenizer import load_tokenizer
    from qa_lightning.model import load_qa_model
    from qa_lightning.predict import predict
    from qa_lightning.runs.checkpoint_reading import Exported
    from qa_lightning.serving.exports import save_hf
    from tests.conftest import CONF_DIR

    torch.manual_seed(0)
    overrides = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    model = load_qa_model(minilm_path(), True, overrides["config_overrides"])
    model_dir = save_hf(
        Exported(model.eval(), load_tokenizer(minilm_path()), InferenceSettings()),
        tmp_path / "hf_model",
    )
    question = ["question='Who wrote it?'", "context='The committee wrote the report in 1998.'"]
    given = [f"model_dir={model_dir}", "precision=32-true", "top_k=2", *question]
    v1 = predict(compose_train(given, config_name="predict"))
    assert all(a["answer"] for a in v1)
    v2 = ["version_2_with_negative=true", "null_score_diff_threshold=-1e9"]
    answers = predict(compose_train([*given, *v2], config_name="predict"))
    assert answers[0] == {"answer": "", "score": answers[0]["score"], "start": 0, "end": 0}
    assert answers[1]["answer"] == v1[0]["answer"]
