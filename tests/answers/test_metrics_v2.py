"""SQuAD v2 metrics against hand-computed values of the official v2 evaluation script."""

from __future__ import annotations

import numpy as np
import pytest

from qa_lightning.answers.metrics import squad_v2_scores
from qa_lightning.answers.postprocess import example_null_scores

REFERENCES = {"q1": ["Paris"], "q2": [], "q3": ["blue whale"]}
ANSWERS = {"q1": "Paris", "q2": "London", "q3": "whale"}  # best non-null answers
NA_PROBS = {"q1": -2.0, "q2": 1.0, "q3": 0.5}  # null score - best span score


def test_answerable_and_unanswerable_at_threshold_zero() -> None:
    scores = squad_v2_scores(ANSWERS, NA_PROBS, REFERENCES, threshold=0.0)
    # q1 answered "Paris" (right), q2 "" (right: no answer), q3 "" (wrong)
    assert scores["exact"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(200 / 3)
    assert (scores["HasAns_exact"], scores["HasAns_total"]) == (50.0, 2.0)
    assert (scores["NoAns_exact"], scores["NoAns_f1"], scores["NoAns_total"]) == (100.0, 100.0, 1.0)
    assert scores["total"] == 3.0


@pytest.mark.parametrize(
    ("threshold", "exact", "f1"),
    [
        (-3.0, 100 / 3, 100 / 3),  # every question "no answer": only q2 right
        (0.6, 200 / 3, (1 + 1 + 2 / 3) / 3 * 100),  # q3 answered "whale": F1 2/3
        (2.0, 100 / 3, (1 + 0 + 2 / 3) / 3 * 100),  # q2 answered "London": wrong
    ],
)
def test_threshold_decides_which_questions_get_no_answer(threshold, exact, f1) -> None:
    scores = squad_v2_scores(ANSWERS, NA_PROBS, REFERENCES, threshold=threshold)
    assert scores["exact"] == pytest.approx(exact)
    assert scores["f1"] == pytest.approx(f1)


def test_best_thresholds_follow_find_best_thresh() -> None:
    scores = squad_v2_scores(ANSWERS, NA_PROBS, REFERENCES)
    # sweep in na_prob order q1, q3, q2 from "all no answer" (1 right):
    # exact: q1 +1 -> 2 (best, thresh -2), q3 +0, q2 -1
    assert scores["best_exact"] == pytest.approx(200 / 3)
    assert scores["best_exact_thresh"] == -2.0
    # f1: q1 +1 -> 2, q3 +2/3 -> 8/3 (best, thresh 0.5), q2 -1
    assert scores["best_f1"] == pytest.approx(800 / 9)
    assert scores["best_f1_thresh"] == 0.5


def test_example_null_score_is_the_minimum_over_windows() -> None:
    nulls = example_null_scores(np.array([0, 1, 0, 1, 2]), np.array([3.0, 1.0, -1.0, 2.0, 5.0]), 4)
    assert nulls.tolist() == [-1.0, 1.0, 5.0, np.inf]


def test_threshold_best_applies_best_f1_thresh() -> None:
    scores = squad_v2_scores(ANSWERS, NA_PROBS, REFERENCES, threshold="best")
    # at 0.5: q1 "Paris", q3 "whale" (na_prob 0.5 is not above it), q2 "" (1.0 is)
    assert scores["null_score_diff_threshold"] == 0.5
    assert scores["f1"] == pytest.approx(800 / 9) == pytest.approx(scores["best_f1"])
    assert scores["exact"] == pytest.approx(200 / 3)
    assert squad_v2_scores(ANSWERS, NA_PROBS, REFERENCES)["null_score_diff_threshold"] == 0.0


def test_has_answer_follows_the_official_script() -> None:
    """An example is HasAns when it has any reference answer, even one that normalises to
    nothing ("The"); it is then scored against "" (``get_raw_scores``)."""
    references = {"q1": ["The"], "q2": []}
    scores = squad_v2_scores({"q1": "an", "q2": "x"}, {"q1": 1.0, "q2": 1.0}, references)
    assert (scores["HasAns_total"], scores["NoAns_total"]) == (1.0, 1.0)
    assert (scores["HasAns_exact"], scores["NoAns_exact"]) == (100.0, 100.0)  # both ""
