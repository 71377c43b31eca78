"""SQuAD exact match and F1 (official normalisation, max over reference answers), v1.1 and v2.

v1.1 goes through ``torchmetrics.functional.text.squad``; v2 needs per-question scores (for the
no-answer threshold), taken from the same torchmetrics helpers so that normalisation is shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torchmetrics.functional.text import squad
from torchmetrics.functional.text.squad import (
    _compute_exact_match_score,
    _compute_f1_score,
    _normalize_text,
)


def squad_v1_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """``{"em": ..., "f1": ...}`` in percent over the questions of ``references``.

    A question without a prediction counts as answered with ``""``.
    """
    if not references:
        raise ValueError("cannot score an empty set of questions")
    preds = [{"id": qid, "prediction_text": predictions.get(qid, "")} for qid in references]
    target = [
        {"id": qid, "answers": {"text": list(texts), "answer_start": [0] * len(texts)}}
        for qid, texts in references.items()
    ]
    scores = squad(preds, target)
    return {"em": float(scores["exact_match"]), "f1": float(scores["f1"])}


def _question_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """Official v2 per-question exact/F1: references normalising to nothing count as ``""``."""
    golds = [r for r in references if _normalize_text(r)] or [""]
    exact = max(float(_compute_exact_match_score(prediction, g)) for g in golds)
    f1 = max(float(_compute_f1_score(prediction, g)) for g in golds)
    return exact, f1


def _best_threshold(
    raw: dict[str, float],
    na_probs: Mapping[str, float],
    has_answer: dict[str, bool],
    answered: dict[str, bool],
) -> tuple[float, float]:
    """Official ``find_best_thresh``: predict "no answer" for questions above the threshold."""
    score = best = float(sum(not h for h in has_answer.values()))
    threshold = 0.0
    for qid in sorted(raw, key=lambda q: na_probs[q]):
        if has_answer[qid]:
            score += raw[qid]
        elif answered[qid]:
            score -= 1
        if score > best:
            best, threshold = score, na_probs[qid]
    return 100.0 * best / len(raw), threshold


def squad_v2_scores(
    answers: Mapping[str, str],
    na_probs: Mapping[str, float],
    references: Mapping[str, Sequence[str]],
    threshold: float | str = 0.0,
) -> dict[str, float]:
    """Official SQuAD v2 metrics in percent.

    ``answers`` are the best non-null answers, ``na_probs`` the no-answer scores (null score minus
    best span score); a question is answered ``""`` when its no-answer score exceeds
    ``threshold``. ``best_exact``/``best_f1`` and their thresholds come from sweeping it;
    ``threshold="best"`` applies ``best_f1_thresh``. ``null_score_diff_threshold`` is the
    threshold applied. A question is HasAns when it has any reference answer (as the official
    script's ``make_qid_to_has_ans``), even one that normalises to nothing.
    """
    if not references:
        raise ValueError("cannot score an empty set of questions")
    has_answer = {q: bool(refs) for q, refs in references.items()}
    raw = {q: _question_scores(answers.get(q, ""), references[q]) for q in references}
    answered = {q: bool(answers.get(q, "")) for q in references}
    best_scores: dict[str, float] = {}
    for i, name in enumerate(("exact", "f1")):
        best, best_threshold = _best_threshold(
            {q: raw[q][i] for q in raw}, na_probs, has_answer, answered
        )
        best_scores[f"best_{name}"], best_scores[f"best_{name}_thresh"] = best, best_threshold
    if threshold == "best":
        threshold = best_scores["best_f1_thresh"]
    final = {q: "" if na_probs[q] > threshold else answers.get(q, "") for q in references}
    scores = {q: _question_scores(final[q], references[q]) for q in references}
    out: dict[str, float] = {}
    for prefix, qids in (
        ("", list(references)),
        ("HasAns_", [q for q in references if has_answer[q]]),
        ("NoAns_", [q for q in references if not has_answer[q]]),
    ):
        if qids:
            out[f"{prefix}exact"] = 100.0 * sum(scores[q][0] for q in qids) / len(qids)
            out[f"{prefix}f1"] = 100.0 * sum(scores[q][1] for q in qids) / len(qids)
            out[f"{prefix}total"] = float(len(qids))
    return {**out, **best_scores, "null_score_diff_threshold": float(threshold)}
