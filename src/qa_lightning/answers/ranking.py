"""One question's window candidates ranked into its ``top_k`` answers with probabilities, as
``utils_qa.py`` and the question-answering pipeline rank them (SQuAD v2's null answer included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Answer:
    """A span of the context: ``context[start:end] == text``; ``score`` is its probability."""

    text: str
    score: float
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        """The keys of the ``question-answering`` pipeline: answer, score, start, end."""
        return {"answer": self.text, "score": self.score, "start": self.start, "end": self.end}


def rank_answers(
    context: str,
    scores: np.ndarray,
    start_chars: np.ndarray,
    end_chars: np.ndarray,
    n_best: int = 20,
    top_k: int = 1,
    null_score: float | None = None,
    null_score_diff_threshold: float = 0.0,
) -> list[Answer]:
    """The ``top_k`` best of one question's window candidates, best first.

    Identical spans (from overlapping windows) are merged keeping their best score; probabilities
    are a softmax over the scores of the ``n_best`` best distinct spans. Candidates with score
    ``-inf`` are invalid and dropped; no valid candidate gives ``[]``.

    With a ``null_score`` (SQuAD v2: the question's smallest CLS start + end logit over its
    windows) the null answer ``""`` (``start == end == 0``) is a candidate too, as in
    ``utils_qa.py``: it takes part in the softmax even when it is not among the ``n_best`` best.
    It ranks above the spans that it beats by more than ``null_score_diff_threshold``, so it is
    the best answer exactly when evaluation predicts ``""``; at threshold 0 the answers are
    ranked by probability, as the question-answering pipeline ranks them with
    ``handle_impossible_answer``.
    """
    best: dict[tuple[int, int], float] = {}
    for score, start, end in zip(
        scores.tolist(), start_chars.tolist(), end_chars.tolist(), strict=True
    ):
        if np.isfinite(score) and score > best.get((start, end), -np.inf):
            best[(start, end)] = score
    # (start, end, score, is_null)
    candidates = [(int(start), int(end), score, False) for (start, end), score in best.items()]
    null = (0, 0, float(null_score), True) if null_score is not None else None
    kept = sorted([*candidates, *([null] if null else [])], key=lambda c: -c[2])[:n_best]
    if null and null not in kept:
        kept.append(null)
    if not kept:
        return []
    values = np.array([c[2] for c in kept], dtype=np.float64)
    probabilities = np.exp(values - values.max())
    probabilities /= probabilities.sum()
    # the null answer competes with its score lowered by the threshold, and loses ties
    order = sorted(
        range(len(kept)),
        key=lambda i: (
            -(kept[i][2] - (null_score_diff_threshold if kept[i][3] else 0.0)),
            kept[i][3],
        ),
    )
    return [
        Answer(context[kept[i][0] : kept[i][1]], float(probabilities[i]), kept[i][0], kept[i][1])
        for i in order[:top_k]
    ]
