"""SQuAD exact match and F1 (official normalisation, max over reference answers), v1.1 and v2.

Text normalisation and tokens come from ``torchmetrics.functional.text.squad``; the scores are
computed here in Python floats (float64), as the official scripts do: torchmetrics computes them
in float32 tensors (8/30 exact matches would be reported as 26.66666603, not 26.666666666666668).
Per-question semantics are torchmetrics' (an empty prediction against an empty reference has
F1 1, as in the official v2 script).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from torchmetrics.functional.text.squad import _get_tokens, _normalize_text


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both normalise to the same text, else 0.0."""
    return float(_normalize_text(prediction) == _normalize_text(reference))


def f1_score(prediction: str, reference: str) -> float:
    """Token-overlap F1 of the normalised texts, in float64 (torchmetrics' semantics)."""
    reference_tokens, prediction_tokens = _get_tokens(reference), _get_tokens(prediction)
    if not reference_tokens or not prediction_tokens:
        return float(reference_tokens == prediction_tokens)
    same = sum((Counter(reference_tokens) & Counter(prediction_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v1_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """``{"em": ..., "f1": ...}`` in percent over the questions of ``references``.

    A question without a prediction counts as answered with ``""``.
    """
    if not references:
        raise ValueError("cannot score an empty set of questions")
    exact = f1 = 0.0
    for qid, texts in references.items():
        prediction = predictions.get(qid, "")
        exact += max((exact_match(prediction, t) for t in texts), default=0.0)
        f1 += max((f1_score(prediction, t) for t in texts), default=0.0)
    return {"em": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}


def _question_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """Official v2 per-question exact/F1: references normalising to nothing count as ``""``."""
    golds = [r for r in references if _normalize_text(r)] or [""]
    return max(exact_match(prediction, g) for g in golds), max(
        f1_score(prediction, g) for g in golds
    )


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
