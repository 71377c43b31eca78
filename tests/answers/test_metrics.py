"""SQuAD v1.1 EM/F1 on hand-computed cases."""

from __future__ import annotations

import pytest

from qa_lightning.answers.metrics import squad_v1_scores


@pytest.mark.parametrize(
    ("prediction", "references", "em", "f1"),
    [
        ("the Eiffel Tower", ["Eiffel Tower"], 100.0, 100.0),  # article removed
        ("The Theater", ["theater"], 100.0, 100.0),  # lower case; "the" only as a word
        ("U.S.A.!", ["usa"], 100.0, 100.0),  # punctuation removed
        ("  New \t York ", ["new york"], 100.0, 100.0),  # whitespace collapsed
        ("an apple, a pear", ["apple pear"], 100.0, 100.0),
        ("Paris France", ["Paris"], 0.0, 200 / 3),  # P = 1/2, R = 1: 2 * 1/2 / (3/2)
        ("Paris", ["Paris France"], 0.0, 200 / 3),  # P = 1, R = 1/2
        ("another day", ["other day"], 0.0, 50.0),  # "an" is not cut from "another": P = R = 1/2
        ("x x y", ["x y"], 0.0, 80.0),  # multiset overlap 2: P = 2/3, R = 1, F1 = 4/5
        ("Berlin", ["Paris"], 0.0, 0.0),
        ("", ["Paris"], 0.0, 0.0),
        # max over references: vs "1990" P = 1/2, R = 1 -> 2/3; vs "in year 1990" P = 1,
        # R = 2/3 -> 4/5
        ("in 1990", ["1990", "in the year 1990"], 0.0, 80.0),
        ("in 1990", ["1990", "In 1990."], 100.0, 100.0),
    ],
)
def test_single_question(prediction, references, em, f1):
    scores = squad_v1_scores({"q": prediction}, {"q": references})
    assert scores["em"] == pytest.approx(em)
    assert scores["f1"] == pytest.approx(f1, abs=1e-4)


def test_average_over_questions():
    predictions = {"q1": "the Eiffel Tower", "q2": "Paris France", "q3": "Berlin"}
    references = {"q1": ["Eiffel Tower"], "q2": ["Paris"], "q3": ["Rome"]}
    scores = squad_v1_scores(predictions, references)
    assert scores["em"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3 * 100, abs=1e-4)


def test_missing_prediction_counts_as_empty_and_extra_predictions_are_ignored():
    predictions = {"q1": "Paris", "other": "Paris"}
    scores = squad_v1_scores(predictions, {"q1": ["Paris"], "q2": ["Rome"]})
    assert scores == {"em": pytest.approx(50.0), "f1": pytest.approx(50.0)}


def test_no_questions_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        squad_v1_scores({"q": "x"}, {})


def test_scores_are_float64_as_the_official_script_computes_them():
    """8 exact matches of 30 are 26.666666666666668 (float32 would give 26.66666603); F1 sums
    Python floats per question, as the official script's ``100.0 * f1 / total``."""
    references = {f"q{i}": ["Paris"] for i in range(30)}
    predictions = {f"q{i}": "Paris" for i in range(8)}
    predictions |= {f"q{i}": "Paris France" for i in range(8, 11)}  # F1 2/3 each
    scores = squad_v1_scores(predictions, references)
    assert scores["em"] == 26.666666666666668 == 100.0 * 8 / 30
    two_thirds = 2 * 0.5 * 1.0 / (0.5 + 1.0)
    assert scores["f1"] == 100.0 * sum([1.0] * 8 + [two_thirds] * 3 + [0.0] * 19) / 30
    assert type(scores["em"]) is float and type(scores["f1"]) is float
